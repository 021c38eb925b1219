"""`X-Request-ID`: every request has one, taken from the caller or made here, and every answer says it.

The id names the request in the gateway's log lines, in its error bodies (`error.request_id`), on its
span, and with the job it submits, so that the worker's lines for that job carry it too.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers import tracing
from workers.logs import log_context

REQUEST_ID_HEADER = "X-Request-ID"
#: What a caller's id may be: short, and nothing a log line or a header could be broken with.
_VALID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}", re.ASCII)
_HEADER = REQUEST_ID_HEADER.lower().encode()
_current: ContextVar[str | None] = ContextVar("dreamomni2_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def caller_request_id(scope: Scope) -> str | None:
    """The request's own `X-Request-ID` if it is a usable one (the first, if sent twice), else None."""
    for name, value in scope.get("headers", ()):
        if name == _HEADER:
            text = value.decode("latin-1").strip()
            return text if _VALID.fullmatch(text) else None
    return None


def current_request_id() -> str | None:
    """The id of the request being answered (None outside one)."""
    return _current.get()


class RequestId:
    """Pure ASGI, outermost: takes the caller's `X-Request-ID` or makes one (an empty, overlong or
    odd one is replaced, never refused), keeps it in the request's state and the log context, and
    adds it to every answer, errors and event streams included. Inside it `current_request_id()` says
    it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = caller_request_id(scope) or new_request_id()
        header = (_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        tracing.annotate({"dreamomni2.request_id": request_id})
        token = _current.set(request_id)
        try:
            with log_context(request_id=request_id):
                await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)

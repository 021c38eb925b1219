"""Pure ASGI middleware (streaming responses pass through untouched): body size limit, HEAD, metrics."""

from __future__ import annotations

import json
import time

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_schemas.errors import ErrorCode
from app.errors import error_body
from app.metrics import GatewayMetrics
from app.request_id import REQUEST_ID_HEADER


class _TooLarge(Exception):
    pass


class _HeadSent(Exception):
    """A HEAD answer is complete: the GET behind it is stopped."""


class BodySizeLimit:
    """Answer 413 as soon as a request body is known to be over `max_bytes`, chunked or not."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send, int(declared))
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send, seen)

    async def _reject(self, send: Send, size: int) -> None:
        body = json.dumps(
            error_body(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"The request body is over the limit of {self.max_bytes} bytes "
                f"({self.max_bytes // (1024 * 1024)} MiB); send fewer or smaller images.",
                {"max_bytes": self.max_bytes, "bytes_seen": size},
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


#: Request headers a cross-origin page may send (CORS), and response headers it may read.
CORS_HEADERS = [
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "Prefer",
    "Cancel-After",
    "Last-Event-ID",
    REQUEST_ID_HEADER,
]
EXPOSED_HEADERS = [
    REQUEST_ID_HEADER,
    "Location",
    "Idempotent-Replayed",
    "Preference-Applied",
    "Retry-After",
    "RateLimit",
    "RateLimit-Policy",
]


class HeadAsGet:
    """HEAD wherever GET exists: the GET runs, its status and headers are sent, its body is not.

    FastAPI's routes answer only the methods they declare, so HEAD would be 405 everywhere (and
    declaring it per route would double every operation in OpenAPI)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        done = False

        async def headers_only(message: Message) -> None:
            nonlocal done
            if done:
                raise _HeadSent  # stop a stream that would go on: the answer is complete
            if message["type"] == "http.response.start":
                await send(message)
            elif message["type"] == "http.response.body":
                done = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                if message.get("more_body"):
                    raise _HeadSent

        try:
            await self.app({**scope, "method": "GET"}, receive, headers_only)
        except* _HeadSent:  # alone, or from inside a streaming response's task group
            pass


class RequestMetrics:
    """Count requests and time them, labelled by route template (not raw path: ids would explode)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(template, scope["method"], status, started)


class Cors(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the service's error envelope."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        failures = bytes(response.body).decode().removeprefix("Disallowed CORS ").split(", ")
        asked = {
            "origin": f"origin {request_headers.get('origin')}",
            "method": f"method {request_headers.get('access-control-request-method')}",
            "headers": f"headers {request_headers.get('access-control-request-headers')}",
            "private-network": "private network access",
        }
        refused = ", ".join(asked.get(failure, failure) for failure in failures)
        body = error_body(
            ErrorCode.CORS_REFUSED,
            f"Cross-origin requests are not allowed here for {refused}; the allowed origins are set by the "
            "operator (DREAMOMNI2_CORS_ORIGINS).",
            {"refused": failures},
        )
        headers = {
            k: v for k, v in response.headers.items() if k.lower() not in ("content-type", "content-length")
        }
        return Response(json.dumps(body), status_code=400, headers=headers, media_type="application/json")

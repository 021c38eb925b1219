"""The request headers the API reads, parsed once each: Prefer, Idempotency-Key, Cancel-After,
Last-Event-ID. Each is a typed dependency, so routes get values, and OpenAPI documents the headers."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header

from api_schemas.errors import ErrorCode, InvalidInput

_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)
_EVENT_ID = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?", re.ASCII)
#: Each part of a Redis stream id is an unsigned 64-bit number.
_MAX_ID_PART = 2**64 - 1
MAX_IDEMPOTENCY_KEY = 255


def _is_stream_id(value: str) -> bool:
    match = _EVENT_ID.fullmatch(value)
    return match is not None and all(int(part) <= _MAX_ID_PART for part in match.groups() if part)


def prefer_wait(
    prefer: Annotated[
        str | None,
        Header(
            description="`wait=N`: hold the answer up to N seconds (capped by DREAMOMNI2_MAX_WAIT_S) and "
            "return the finished job (200) if it finishes in time; otherwise the usual 202.",
            examples=["wait=30"],
        ),
    ] = None,
) -> int | None:
    """The seconds of `Prefer: wait=N`, as asked (the service caps them); None without one."""
    match = _PREFER_WAIT.search(prefer or "")
    return int(match.group(1)) if match else None


def idempotency_key(
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=MAX_IDEMPOTENCY_KEY,
            description="The same key and body return the same job (header `Idempotent-Replayed: true`); "
            "the same key with a different body answers 422.",
        ),
    ] = None,
) -> str | None:
    if idempotency_key is not None and not idempotency_key.strip():
        # An empty key would be one key shared by every client that sends the header blank.
        raise InvalidInput(
            "Idempotency-Key is empty; send a non-empty key (e.g. a UUID) or leave the header out.",
            code=ErrorCode.INVALID_REQUEST,
        )
    return idempotency_key


def cancel_after(
    cancel_after: Annotated[
        str | None,
        Header(
            description="Like `deadline_s`: cancel the job unrun if no worker starts it within N seconds.",
            examples=["120"],
        ),
    ] = None,
) -> float | None:
    if cancel_after is None:
        return None
    try:
        seconds = float(cancel_after)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:  # also refuses nan
        raise InvalidInput(
            f"Cancel-After must be a positive number of seconds; got {cancel_after!r}.",
            code=ErrorCode.INVALID_REQUEST,
        )
    return seconds


def last_event_id(
    last_event_id: Annotated[
        str | None,
        Header(
            description="Resume a stream after this event id (what the stream sent as `id`).",
        ),
    ] = None,
) -> str | None:
    if last_event_id and not _is_stream_id(last_event_id):
        # Redis would refuse it mid-stream, after the 200 is sent: refuse it while an answer can say why.
        raise InvalidInput(
            f"Last-Event-ID {last_event_id!r} is not an id this stream sent (like `1700000000000-0`).",
            code=ErrorCode.INVALID_REQUEST,
        )
    return last_event_id or None


PreferWait = Annotated[int | None, Depends(prefer_wait)]
IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]
CancelAfter = Annotated[float | None, Depends(cancel_after)]
LastEventId = Annotated[str | None, Depends(last_event_id)]

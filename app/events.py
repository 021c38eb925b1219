"""The Server-Sent Events stream of one job, read from its Redis stream (works across replicas)."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import redis.asyncio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from api_schemas.api import JobStatus
from workers.store import Event, parse_events
from workers.store.jobs import EVENTS_PER_READ

if TYPE_CHECKING:
    from app.service import JobService

TERMINAL = {status.value for status in JobStatus if status.is_terminal()}


def _sse(event: Event, data: dict) -> dict[str, str]:
    return {"id": event.id, "event": event.type, "data": json.dumps(data)}


async def job_events(
    request: Request,
    aredis: redis.asyncio.Redis,
    service: JobService,
    job_id: str,
    last_event_id: str | None,
    block_ms: int = 2_000,
) -> AsyncIterator[dict[str, str]]:
    """`queued` (with position), `started`, `progress`, then one final event carrying the job object.

    Resumes after `last_event_id`. A client that connected (or reconnected) after the end still gets
    the final event, so every stream ends with one.
    """
    store = service.store.jobs
    # The final event's job object: its signed links at the base this stream was asked at.
    render = functools.partial(service.render_id, base_url=str(request.base_url))
    key = store.keys.events(job_id)
    after = last_event_id or "0-0"
    # A job that has already ended has all its events in the stream: read them without blocking, so a
    # client reconnecting after the end gets the final event at once.
    record = await run_in_threadpool(store.get, job_id)
    ended = record is None or record.status.is_terminal()
    while True:
        # The block stays well under redis-py's default 5 s socket timeout, which would otherwise end
        # the read (and the stream) with a TimeoutError whenever a job has no event for that long.
        reply = await aredis.xread({key: after}, count=EVENTS_PER_READ, block=None if ended else block_ms)
        events = parse_events(reply)
        if not events:
            if await request.is_disconnected():
                return
            record = await run_in_threadpool(store.get, job_id)
            if record is None:  # expired while streaming: nothing more will come
                return
            if record.status.is_terminal():
                # Nothing after the client's position although the job ended: it saw the final event
                # already (or the stream was trimmed). Send the final event again, then close.
                final = next((e for e in reversed(await _all(aredis, key)) if e.type in TERMINAL), None)
                if final is not None:
                    yield _sse(final, await run_in_threadpool(render, job_id))
                return
            continue
        for event in events:
            after = event.id
            if event.type in TERMINAL:
                yield _sse(event, await run_in_threadpool(render, job_id))
                return
            data = event.data
            if event.type == "queued":
                # The position now, while the job waits; a replay after it started has none.
                position = await run_in_threadpool(store.queue_position, job_id)
                if position is not None:
                    data = {**data, "position": position}
            yield _sse(event, data)


def _stream_id(value: str) -> tuple[int, int]:
    milliseconds, _, sequence = value.partition("-")
    return int(milliseconds), int(sequence or 0)


async def stream_ended(
    aredis: redis.asyncio.Redis, service: JobService, job_id: str, last_event_id: str | None
) -> bool:
    """True when the client has already seen the job's final event (it resumes at or after it).

    Such a reconnect answers 204: a browser's EventSource reconnects by itself after every close, and
    204 is what tells it to stop; re-sending the final event would make it loop."""
    if last_event_id is None:
        return False
    record = await run_in_threadpool(service.store.jobs.get, job_id)
    if record is None or not record.status.is_terminal():
        return False
    events = await _all(aredis, service.store.jobs.keys.events(job_id))
    final = next((e for e in reversed(events) if e.type in TERMINAL), None)
    return final is not None and _stream_id(last_event_id) >= _stream_id(final.id)


async def _all(aredis: redis.asyncio.Redis, key: str) -> list[Event]:
    entries = await aredis.xrange(key)
    return parse_events([(key, entries)])

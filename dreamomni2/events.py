"""A job's event stream: Server-Sent Events as they arrive, and the progress they add up to.

The service streams `queued` (data: the queue position), `started`, `progress` (stage, step, total),
then one final `succeeded`, `failed` or `canceled` whose data is the job object. Every event has an
id; a client that reconnects with `Last-Event-ID` gets exactly the events after it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from api_schemas.api import Job, JobStatus, ProgressEvent
from dreamomni2.errors import ServerError

#: Event types after which the stream ends: their data is the job object.
FINAL_EVENTS = frozenset(status.value for status in JobStatus if status.is_terminal())


@dataclass(frozen=True)
class ServerSentEvent:
    """One event of a `text/event-stream`, as the SSE specification assembles it from lines."""

    id: str | None
    event: str
    data: str


@dataclass
class SSEDecoder:
    """Assembles events from the lines of a `text/event-stream` (line terminators removed).

    Follows the WHATWG rules: `:` starts a comment (the service's pings), `data` lines join with a
    newline, a blank line ends an event, an event without data is dropped, and the last `id` seen
    carries over to later events. A partial event at the end of a broken connection is never
    returned, since no blank line ends it.
    """

    last_event_id: str | None = None
    _event: str = ""
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> ServerSentEvent | None:
        """Take one line; returns the event it completes, if any."""
        if not line:
            event, data = self._event or "message", self._data
            self._event, self._data = "", []
            if not data:
                return None
            return ServerSentEvent(self.last_event_id, event, "\n".join(data))
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_event_id = value or None
        # `retry` and unknown fields are ignored: reconnection timing is the client's policy here.
        return None


@dataclass(frozen=True)
class JobEvent:
    """One event of a job's stream.

    Attributes:
        id: the event id (a Redis stream id such as `1795774997760-0`), to resume after.
        type: `queued`, `started`, `progress`, `succeeded`, `failed` or `canceled`.
        data: the event's JSON data: `{"position": n}`, `{"attempt": n}`, `{"stage", "step", "total"}`,
            or the job object for the final events.
        job: for a final event, its data as the job object; else None.
    """

    id: str | None
    type: str
    data: dict[str, Any]
    job: Job | None = None

    @property
    def final(self) -> bool:
        """Whether this is the job's last event (`succeeded`, `failed` or `canceled`)."""
        return self.type in FINAL_EVENTS

    @classmethod
    def from_sse(cls, event: ServerSentEvent) -> JobEvent:
        """Parse a server-sent event of a job's stream."""
        try:
            data = json.loads(event.data)
        except ValueError:
            raise ServerError(
                f"The event stream sent {event.event!r} with data that is not JSON: {event.data[:200]!r}",
                code="invalid_event",
            ) from None
        if not isinstance(data, dict):
            data = {"value": data}
        job = None
        if event.event in FINAL_EVENTS:
            try:
                job = Job.model_validate(data)
            except ValidationError as exc:
                raise ServerError(
                    f"The final {event.event!r} event does not carry a job object: {exc}",
                    code="invalid_event",
                ) from None
        return cls(event.id, event.event, data, job)


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands, as a progress bar shows it: what `wait(on_progress=...)` is called with.

    Attributes:
        job_id: the job.
        status: queued, running, or how it ended (the last update).
        queue_position: 1 = next to run; only while queued (when the service knows it).
        stage: translate, encode, denoise or decode while running; None before the first stage.
        step, total: steps done of the current stage (denoise: the denoising steps; others 0/1 or 1/1).
        event: the stream event behind this update; None when the update came from polling the job
            while it waits in the queue (the stream sends nothing then).
        job: the job object on the final update; else None.
        preview: on the denoising steps that carry one (every DREAMOMNI2_PREVIEW_EVERY-th), the image
            as it forms: a `data:image/jpeg;base64,...` URI of a few KB (`preview_bytes()` decodes it);
            else None.
    """

    job_id: str
    status: JobStatus
    queue_position: int | None = None
    stage: str | None = None
    step: int = 0
    total: int = 0
    event: JobEvent | None = None
    job: Job | None = None
    preview: str | None = None

    def preview_bytes(self) -> bytes | None:
        """The preview's image file (JPEG), to save or show; None without a preview or when the
        service sent one that is not a base64 data URI."""
        if not self.preview or not self.preview.startswith("data:") or ";base64," not in self.preview:
            return None
        try:
            return base64.b64decode(self.preview.split(";base64,", 1)[1], validate=True)
        except (binascii.Error, ValueError):
            return None

    @property
    def fraction(self) -> float | None:
        """step / total of the current stage, or None when there is no stage yet."""
        return self.step / self.total if self.total else None

    def describe(self) -> str:
        """A short human line: `queued (position 2)`, `denoise 3/30`, `succeeded`."""
        if self.status is JobStatus.QUEUED:
            return f"queued (position {self.queue_position})" if self.queue_position else "queued"
        if self.status is JobStatus.RUNNING:
            return f"{self.stage} {self.step}/{self.total}" if self.stage else "started"
        return self.status.value


class ProgressTracker:
    """Turns a job's events (and polls of it while queued) into `JobProgress` updates."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.current: JobProgress | None = None

    def from_event(self, event: JobEvent) -> JobProgress | None:
        """The update an event makes; None for event types this client does not know."""
        update: JobProgress | None
        if event.type == "queued":
            position = event.data.get("position")
            update = JobProgress(
                self.job_id, JobStatus.QUEUED, queue_position=position if isinstance(position, int) else None
            )
        elif event.type == "started":
            update = JobProgress(self.job_id, JobStatus.RUNNING)
        elif event.type == "progress":
            progress = ProgressEvent.model_validate(event.data)
            update = JobProgress(
                self.job_id,
                JobStatus.RUNNING,
                stage=progress.stage,
                step=progress.step,
                total=progress.total,
                preview=progress.preview,
            )
        elif event.job is not None:
            job, progress = event.job, event.job.progress
            update = JobProgress(
                self.job_id,
                job.status,
                stage=progress.stage,
                step=progress.step,
                total=progress.total,
                job=job,
            )
        else:
            return None
        self.current = replace(update, event=event)
        return self.current

    def from_job(self, job: Job) -> JobProgress | None:
        """The update a poll of the job makes while it waits in the queue: a new queue position.

        Only queued jobs are reported this way; anything else is left to the stream, whose events
        come in order (a poll could report step 5 before the stream delivers steps 1 to 4).
        """
        current = self.current
        if job.status is not JobStatus.QUEUED or current is None or current.status is not JobStatus.QUEUED:
            return None
        if current.queue_position == job.queue_position:
            return None
        self.current = JobProgress(self.job_id, JobStatus.QUEUED, queue_position=job.queue_position)
        return self.current

"""What the sync and async clients share: settings, request building, retry and reconnect policy.

Everything here is free of I/O, so `Client` and `AsyncClient` differ only in how they send and wait.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from api_schemas.api import MAX_RESULTS, Job, JobOptions, OutputFormat
from api_schemas.common import MixBlocks, StepCache, Task, WebhookEvent
from api_schemas.loras import LoraChoice
from dreamomni2.errors import (
    CONNECTION_LOST,
    NO_SIGNED_URL,
    ConflictError,
    DreamOmni2Error,
    NotFoundError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    WaitTimeoutError,
    invalid_options,
    job_error,
)
from dreamomni2.events import JobEvent, SSEDecoder
from dreamomni2.images import ImageInput, to_upload

try:
    __version__ = version("dreamomni2-serve")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

#: Where `make up` serves the API (its port is `DREAMOMNI2_PORT`, 8000 by default).
DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV = "DREAMOMNI2_SERVER"
API_KEY_ENV = "DREAMOMNI2_API_KEY"
USER_AGENT = f"dreamomni2-python/{__version__}"

#: A job object, or its id.
JobRef = Job | str

#: The stream's read timeout while a job runs: the service pings every 15 s, so a connection quiet for
#: this long is dead and is reopened.
STREAM_READ_TIMEOUT_S = 45.0


def resolve_server(server: str | None) -> str:
    """The base URL: `server`, else `$DREAMOMNI2_SERVER`, else http://127.0.0.1:8000 (no trailing /)."""
    value = (server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER).strip()
    if "://" not in value:
        value = f"http://{value}"
    return value.rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    """The API key: `api_key`, else `$DREAMOMNI2_API_KEY`, else None (a service without keys)."""
    return api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def job_id_of(job: JobRef) -> str:
    return job.id if isinstance(job, Job) else job


def job_path(job: JobRef, suffix: str = "") -> str:
    # Quoted: an id is the caller's input and must not be able to reach another route.
    return f"/v1/jobs/{quote(job_id_of(job), safe='')}{suffix}"


def result_path(job: JobRef, index: int = 0) -> str:
    """`GET .../result` of image `index`: 0 the job's first image (a pair's source), 1 the second (a
    pair's target), up to num_images - 1."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_RESULTS:
        raise ValueError(
            f"index must be 0..{MAX_RESULTS - 1} (0 the first image or a pair's source, 1 the second or "
            f"a pair's target, ...); got {index!r}."
        )
    return job_path(job, f"/result?index={index}" if index else "/result")


def signed_result_url(job: Job, index: int, min_valid_s: float) -> str | None:
    """The job object's signed link to image `index` (`result.signed_url`), if it has one that works
    for at least `min_valid_s` more seconds."""
    results = job.results or ([job.result] if job.result is not None else [])
    if not 0 <= index < len(results):
        return None
    result = results[index]
    expires_at = result.signed_url_expires_at
    if result.signed_url is None or expires_at is None or expires_at.timestamp() - time.time() < min_valid_s:
        return None
    return result.signed_url


def no_signed_url(job: Job, index: int) -> DreamOmni2Error:
    """Why a job object read just now has no signed link to image `index`."""
    error = job_error(job)
    if error is not None:
        return error
    if not job.status.is_terminal():
        return ConflictError(
            f"Job {job.id} is {job.status.value}; its result has a link once its status is succeeded.",
            code="job_not_finished",
            details={"status": job.status.value},
        )
    count = len(job.results or ([job.result] if job.result is not None else []))
    if index >= count:
        return NotFoundError(
            f"Job {job.id} has {count} result image(s); index {index} does not exist.",
            code="result_index",
            details={"index": index, "results": count},
        )
    return ServerError(
        f"The service sent job {job.id} without a signed link to image {index}: it predates result links; "
        "download the image with the API key instead (`result_bytes`).",
        code=NO_SIGNED_URL,
    )


def succeeded(job: Job) -> Job:
    """The job if it succeeded; raises JobFailedError or JobCanceledError if it did not."""
    error = job_error(job)
    if error is not None:
        raise error
    return job


def ended(job: Job) -> Job:
    """As `succeeded`, for a job the stream says has ended; a job still going is the service's error."""
    if not job.status.is_terminal():
        raise ServerError(
            f"The event stream of job {job.id} is over, but the job is {job.status.value}.",
            code="invalid_event",
        )
    return succeeded(job)


#: The longest `Retry-After` the client honours; a longer one is cut to this.
MAX_RETRY_AFTER_S = 30.0


def backoff(attempt: int, error: DreamOmni2Error | None = None) -> float:
    """Seconds before retry `attempt` (0-based): what the service asked (`Retry-After`), else 0.25,
    0.5, 1, 2, then 4 at most."""
    if error is not None and error.retry_after is not None:
        return min(error.retry_after, MAX_RETRY_AFTER_S)
    return min(0.25 * 2.0**attempt, 4.0)


def retryable(error: DreamOmni2Error) -> bool:
    """Whether an error answer says "try again": the request did not take effect and may later."""
    return (
        isinstance(error, ServiceUnavailableError | RateLimitError) or error.code == "idempotency_key_in_use"
    )


def reached_server(error: httpx.TransportError) -> bool:
    """Whether the request may have reached the service (so resending it could repeat it)."""
    return not isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


@dataclass(frozen=True)
class Prepared:
    """One API call, ready to send.

    `idempotent`: sending it twice has the effect of sending it once, so it may be resent after its
    answer was lost (reads, and submissions, which always carry an Idempotency-Key).
    """

    method: str
    path: str
    idempotent: bool
    headers: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, Any]] | None = None


#: What a caller may pass as one of `loras`: a `LoraChoice`, `{"name", "scale"}`, or `NAME[:SCALE]`.
LoraInput = LoraChoice | dict | str


def parse_lora(text: str) -> LoraChoice:
    """`NAME` or `NAME:SCALE` (the command line's `--lora`) as a request's LoRA choice."""
    name, sep, scale = text.strip().rpartition(":") if ":" in text else (text.strip(), "", "")
    name = name.strip()
    if not name:
        raise ValueError(f"{text!r} names no LoRA (use NAME or NAME:SCALE, e.g. style:0.8)")
    if not sep:
        return LoraChoice(name=name)
    try:
        value = float(scale)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(
            f"the scale in {text!r} is not a finite number (use NAME or NAME:SCALE, e.g. style:0.8)"
        )
    return LoraChoice(name=name, scale=value)


def lora_choices(loras: Sequence[LoraInput] | None) -> list[LoraChoice] | None:
    """The caller's `loras` as the request's choices (None: not sent)."""
    if loras is None:
        return None
    if isinstance(loras, str | dict | LoraChoice):
        raise TypeError("loras must be a list, e.g. ['style:0.8'] or [{'name': 'style', 'scale': 0.8}]")
    return [parse_lora(c) if isinstance(c, str) else LoraChoice.model_validate(c) for c in loras]


def _form_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def prepare_submission(
    instruction: str | None,
    images: Sequence[ImageInput],
    *,
    task: Task | str | None,
    seed: int | None,
    steps: int | None,
    guidance: float | None,
    size: tuple[int, int] | None,
    translate: bool | None,
    output_format: OutputFormat | str | None,
    step_cache: StepCache | str | None,
    webhook_url: str | None,
    webhook_events: Sequence[WebhookEvent | str] | None,
    deadline_s: float | None,
    idempotency_key: str | None,
    source_prompt: str | None = None,
    target_prompt: str | None = None,
    attribute: str | None = None,
    mix_blocks: MixBlocks | str | None = None,
    mix_steps: float | None = None,
    mix_strength: float | None = None,
    num_images: int | None = None,
    loras: Sequence[LoraInput] | None = None,
    count: int | None = None,
) -> Prepared:
    """`POST /v1/jobs` as multipart: the images in order, then the options the caller set.

    The options are checked by the API's own model (`JobOptions`) first, so a misspelt choice fails
    here with the field named; limits (steps, sizes, image counts, the mixing fractions' 0..1) are
    the deployment's to check. Feature Mixing sends no instruction and no images, and its own fields.
    """
    if isinstance(images, str | bytes | bytearray | memoryview | os.PathLike) or not isinstance(
        images, Sequence
    ):
        # One image passed where a list belongs: a str would otherwise be read as a list of characters.
        raise TypeError("images must be a list (or tuple) of images, e.g. [path]; got a single value.")
    width, height = size if size is not None else (None, None)
    given = {
        "instruction": instruction,
        "task": task,
        "seed": seed,
        "steps": steps,
        "num_images": num_images,
        "guidance": guidance,
        "width": width,
        "height": height,
        "translate": translate,
        "output_format": output_format,
        "step_cache": step_cache,
        "webhook_url": webhook_url,
        "webhook_events": list(webhook_events) if webhook_events is not None else None,
        "deadline_s": deadline_s,
        "source_prompt": source_prompt,
        "target_prompt": target_prompt,
        "attribute": attribute,
        "mix_blocks": mix_blocks,
        "mix_steps": mix_steps,
        "mix_strength": mix_strength,
        "loras": lora_choices(loras),
        "count": count,
    }
    try:
        options = JobOptions.model_validate(
            {name: value for name, value in given.items() if value is not None}
        )
    except ValidationError as exc:
        raise invalid_options(exc) from None
    uploads = [to_upload(image, number) for number, image in enumerate(images, start=1)]
    # Only what the caller set: the deployment fills in its own defaults for the rest.
    fields = options.model_dump(mode="json", exclude_unset=True)
    parts: list[tuple[str, Any]] = [upload.part() for upload in uploads]
    # `loras` travels as the JSON text the gateway reads from a form field; the rest as plain values.
    parts += [
        (name, (None, json.dumps(value) if name == "loras" else _form_value(value)))
        for name, value in fields.items()
    ]
    # Always a key, so that a submission whose answer was lost can be resent without a second job.
    key = idempotency_key if idempotency_key is not None else f"dreamomni2-{uuid.uuid4().hex}"
    return Prepared("POST", "/v1/jobs", idempotent=True, headers={"Idempotency-Key": key}, files=parts)


def prepare_text_job(
    task: Task,
    *,
    instruction: str | None = None,
    images: Sequence[ImageInput] = (),
    attribute: str | None = None,
    count: int | None = None,
    webhook_url: str | None = None,
    webhook_events: Sequence[WebhookEvent | str] | None = None,
    deadline_s: float | None = None,
    idempotency_key: str | None = None,
) -> Prepared:
    """`POST /v1/jobs` of a text job (`judge`: instruction and images; `mixing_prompts`: attribute and
    count): none of the image-sampling fields, which the service refuses with these tasks."""
    return prepare_submission(
        instruction,
        images,
        task=task,
        seed=None,
        steps=None,
        guidance=None,
        size=None,
        translate=None,
        output_format=None,
        step_cache=None,
        webhook_url=webhook_url,
        webhook_events=webhook_events,
        deadline_s=deadline_s,
        idempotency_key=idempotency_key,
        attribute=attribute,
        count=count,
    )


class Quiet(StrEnum):
    """What a stream's read timeout calls for (see `StreamFollower.timed_out`)."""

    POLL = "poll"
    REOPEN = "reopen"
    DEAD = "dead"


class StreamFollower:
    """Follows one job's event stream across connections: resumes with `Last-Event-ID` after a drop,
    backs off between attempts, and keeps the overall deadline. The clients only move bytes:

        while not follower.over:
            open follower.request() with read timeout follower.read_timeout()
            204 -> follower.finish(); an error answer -> follower.refused(error)
            each line -> follower.feed(line) -> JobEvent or None
            stream closed early -> follower.failed(follower.ended_early())
            read timeout -> follower.timed_out(); other transport errors -> follower.failed(error)
            sleep follower.take_delay()

    Until the stream has delivered an event it is a request like any other, given up after
    `max_retries` failed attempts (an unreachable service fails fast). Once it has worked, a drop
    is more likely a restarting gateway or a proxy's idle cut: up to `max_reconnects` attempts in a
    row (about 8 s of backoff) are made before giving up; every event received resets the count.

    With `queue_poll_s` set, a connection opened while the job may be queued (the first, and those
    after a `queued` event) reads with that short a timeout: the stream is silent in the queue, so a
    quiet spell is the caller's cue to poll the queue position (`Quiet.POLL`); the stream is then
    reopened where it left off. A read timeout holds for the whole connection, so one opened short
    whose job has started since is reopened with the long timeout (`Quiet.REOPEN`), which is not a
    failure.
    """

    def __init__(
        self,
        job_id: str,
        *,
        last_event_id: str | None = None,
        timeout: float | None = None,
        queue_poll_s: float | None = None,
        max_retries: int = 2,
        max_reconnects: int = 5,
    ) -> None:
        self.job_id = job_id
        self.last_event_id = last_event_id
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.queue_poll_s = queue_poll_s
        self.max_retries = max_retries
        self.max_reconnects = max_reconnects
        #: True once the stream is over: its final event came, or the service said it had (204).
        self.over = False
        self.failures = 0
        self.delivered = False
        # Until the stream says otherwise the job may be queued (it usually is, just submitted).
        self.queued = True
        self.short_read = False
        self._decoder = SSEDecoder()
        self._delay = 0.0

    def request(self) -> Prepared:
        """The next connection's request."""
        self.check_deadline()
        self._decoder = SSEDecoder(
            last_event_id=self.last_event_id
        )  # a partial event dies with its connection
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        return Prepared("GET", job_path(self.job_id, "/events"), idempotent=True, headers=headers)

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise WaitTimeoutError(self.job_id, self.timeout or 0.0)

    def read_timeout(self) -> float:
        """How long one read of the next connection may wait: short while queued (to poll), never
        past the deadline."""
        self.short_read = bool(self.queued and self.queue_poll_s)
        wait = self.queue_poll_s if self.short_read and self.queue_poll_s else STREAM_READ_TIMEOUT_S
        remaining = self.remaining()
        # A little past the deadline, so the read ends just after it and the deadline check fires.
        return wait if remaining is None else max(0.05, min(wait, remaining + 0.05))

    def feed(self, line: str) -> JobEvent | None:
        """One line of the stream; returns the event it completes, if any."""
        self.check_deadline()  # a busy stream never times out on its own
        sse = self._decoder.feed(line)
        if sse is None:
            return None
        event = JobEvent.from_sse(sse)
        if sse.id is not None:
            self.last_event_id = sse.id
        self.failures = 0
        self.delivered = True
        self.queued = event.type == "queued"
        self.over = event.final
        return event

    def finish(self) -> None:
        """The service answered 204: the caller resumed at or after the final event; nothing follows."""
        self.over = True

    def refused(self, error: DreamOmni2Error) -> None:
        """An error answer to the stream request: try again later if it says so, else raise it."""
        if not retryable(error):
            raise error
        self.failed(error)

    def timed_out(self) -> Quiet:
        """What a read timeout means: a queued job's expected silence (poll it, then reopen), a short
        timeout outlived by the job's start (reopen), or a dead connection (a failure)."""
        self.check_deadline()
        if not self.short_read:
            return Quiet.DEAD
        return Quiet.POLL if self.queued else Quiet.REOPEN

    def failed(self, error: DreamOmni2Error) -> None:
        """A connection failed or ended early: back off before the next (`take_delay`); raises
        `error` when too many failed in a row (or the deadline comes first)."""
        self.check_deadline()
        self.failures += 1
        if self.failures > (self.max_reconnects if self.delivered else self.max_retries):
            raise error
        delay = backoff(self.failures - 1, error)
        remaining = self.remaining()
        self._delay = delay if remaining is None else min(delay, remaining)

    def take_delay(self) -> float:
        """The seconds to wait before the next connection (0 when the last one did not fail)."""
        delay, self._delay = self._delay, 0.0
        return delay

    def ended_early(self) -> ServiceUnavailableError:
        """The error for a stream the server closed before the job's final event."""
        return ServiceUnavailableError(
            f"The event stream of job {self.job_id} ended before its final event.", code=CONNECTION_LOST
        )

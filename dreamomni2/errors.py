"""The client's exceptions: one class per way a call can go wrong, each carrying the service's error
code, its message and the HTTP status it came with.

    DreamOmni2Error
    ├── InvalidInputError          4xx refusals of the request (400, 413, 415, 422, ...), local checks
    ├── AuthenticationError        401, 403: missing or unknown API key, a forged result link
    ├── NotFoundError              404: unknown or expired job (or another key's); 410: an expired link
    ├── ConflictError              409: the job is not in a state that allows this
    ├── RateLimitError             429
    ├── ServerError                5xx
    │   └── ServiceUnavailableError  502, 503, 504, or no answer at all (status None)
    ├── JobError                   the job ended without a result; `.job` is the job object
    │   ├── JobFailedError
    │   └── JobCanceledError
    ├── WaitTimeoutError           `wait(timeout=...)` ran out first
    └── WebhookVerificationError   a webhook delivery whose signature does not verify

`code` is the service's code (`api_schemas.errors.ErrorCode`, the README's error table) whenever the
service answered; errors raised without an answer use codes of their own: `unreachable` (no
connection), `connection_lost` (the connection broke mid-request), `wait_timeout`,
`invalid_signature`, `invalid_event` (an event stream that breaks the API's contract),
`no_signed_url` (a succeeded job object without a signed result link: a service from before them), and
`invalid_request` for options refused before sending.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from api_schemas.api import ErrorEnvelope, JobStatus
from api_schemas.errors import STATUS_CODES, ErrorCode

if TYPE_CHECKING:
    from api_schemas.api import Job

#: Client-side codes, for errors that did not come from an answer of the service.
UNREACHABLE = "unreachable"
CONNECTION_LOST = "connection_lost"
WAIT_TIMEOUT = "wait_timeout"
INVALID_SIGNATURE = "invalid_signature"
NO_SIGNED_URL = "no_signed_url"


class DreamOmni2Error(Exception):
    """Base of every error the client raises.

    Attributes:
        code: the service's error code (e.g. `invalid_steps`, `job_not_found`), or a client-side one.
        message: what went wrong and what to do about it, as the service phrased it.
        status: the HTTP status of the answer; None when there was no answer.
        details: the numbers and names behind the message (the envelope's `details`), or {}.
        retry_after: the seconds the service asked to wait before trying again (`Retry-After`), if any.
        request_id: the id the service gave the request (`X-Request-ID`), to quote when reporting it.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int | None = None,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.details = details or {}
        self.retry_after = retry_after
        self.request_id = request_id

    def __str__(self) -> str:
        where = f" (HTTP {self.status})" if self.status is not None else ""
        return f"{self.code}: {self.message}{where}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, message={self.message!r})"


class InvalidInputError(DreamOmni2Error):
    """The service refused the request as sent (4xx), or an option was refused before sending."""


class AuthenticationError(DreamOmni2Error):
    """The API key is missing or unknown (401), or not allowed (403)."""


class NotFoundError(DreamOmni2Error):
    """No such job for this API key, or it (or its result) expired (404); a signed result link past its
    expiry (410, `link_expired`)."""


class ConflictError(DreamOmni2Error):
    """The job is not in a state that allows this (409): no result yet, already finished, ..."""


class RateLimitError(DreamOmni2Error):
    """Too many requests (429): slow down and retry."""


class ServerError(DreamOmni2Error):
    """The service failed to answer the request (5xx)."""


class ServiceUnavailableError(ServerError):
    """The service, or what it depends on, cannot be reached: 502/503/504, or no answer at all."""


class WaitTimeoutError(DreamOmni2Error):
    """`wait(timeout=...)` ran out before the job ended; the job goes on. `job_id` names it."""

    def __init__(self, job_id: str, timeout: float) -> None:
        super().__init__(
            f"Job {job_id} did not finish within {timeout:g} s; it is still queued or running.",
            code=WAIT_TIMEOUT,
            details={"job_id": job_id, "timeout_s": timeout},
        )
        self.job_id = job_id


class JobError(DreamOmni2Error):
    """The job ended without a result. `job` is the job object; `code` and `message` are its error's.

    `status` is the HTTP status of the answer that reported it (409 from the result download), or
    None when the job's final event or object reported it.
    """

    def __init__(self, job: Job, *, status: int | None = None) -> None:
        error = job.error
        default = "canceled" if job.status is JobStatus.CANCELED else ErrorCode.INTERNAL.value
        code = error.code if error is not None else default
        message = error.message if error is not None else f"Job {job.id} ended {job.status.value}."
        details = dict(error.details or {}) if error is not None else {}
        super().__init__(message, code=code, status=status, details=details)
        self.job = job


class JobFailedError(JobError):
    """The job failed (`job.error` says why: `invalid_image`, `out_of_memory`, `timeout`, ...)."""


class JobCanceledError(JobError):
    """The job was canceled: at its owner's request (`canceled`) or by its deadline (`deadline`)."""


class WebhookVerificationError(DreamOmni2Error):
    """A webhook delivery's signature, timestamp or headers do not verify with the secret."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=INVALID_SIGNATURE)


def job_error(job: Job, *, status: int | None = None) -> JobError | None:
    """The exception for a job that ended without a result; None for one that succeeded or goes on."""
    if job.status is JobStatus.FAILED:
        return JobFailedError(job, status=status)
    if job.status is JobStatus.CANCELED:
        return JobCanceledError(job, status=status)
    return None


def _class_for(status: int) -> type[DreamOmni2Error]:
    if status in (401, 403):
        return AuthenticationError
    if status in (404, 410):
        return NotFoundError
    if status == 409:
        return ConflictError
    if status == 429:
        return RateLimitError
    if status in (502, 503, 504):
        return ServiceUnavailableError
    if status >= 500:
        return ServerError
    return InvalidInputError


def _retry_after(response: httpx.Response) -> float | None:
    # Only the delta-seconds form: the service sends it, and an HTTP date would need the clocks to agree.
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None


def error_from_response(response: httpx.Response) -> DreamOmni2Error:
    """The exception for an error answer (its body must have been read), from the service's envelope."""
    status = response.status_code
    cls = _class_for(status)
    retry_after = _retry_after(response)
    request_id = response.headers.get("x-request-id")
    try:
        info = ErrorEnvelope.model_validate_json(response.content).error
    except ValidationError:
        # Not the service's envelope: a proxy or load balancer answered. Say so, with what it sent.
        code = STATUS_CODES.get(status, ErrorCode.INTERNAL if status >= 500 else ErrorCode.BAD_REQUEST)
        text = response.text.strip()[:200] or response.reason_phrase
        message = f"HTTP {status} from {response.request.url}: {text}"
        return cls(message, code=code.value, status=status, retry_after=retry_after, request_id=request_id)
    return cls(
        info.message,
        code=info.code,
        status=status,
        details=info.details,
        retry_after=retry_after,
        request_id=info.request_id or request_id,
    )


def error_from_transport(error: httpx.TransportError, server: str) -> ServiceUnavailableError:
    """The exception for a request that got no answer: no connection, or one that broke."""
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return ServiceUnavailableError(
            f"Cannot connect to the service at {server} ({error or type(error).__name__}); "
            "is it running, and is the address right?",
            code=UNREACHABLE,
        )
    return ServiceUnavailableError(
        f"The connection to {server} failed mid-request ({type(error).__name__}: {error}).",
        code=CONNECTION_LOST,
    )


def invalid_options(error: ValidationError) -> InvalidInputError:
    """Options refused before sending, named by field, in the service's own `invalid_request` shape."""
    problems = [
        {"field": ".".join(map(str, e["loc"])) or "body", "problem": e["msg"]} for e in error.errors()
    ]
    summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
    return InvalidInputError(
        f"The request is invalid: {summary}.",
        code=ErrorCode.INVALID_REQUEST.value,
        details={"errors": problems},
    )

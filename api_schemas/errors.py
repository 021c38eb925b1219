"""One error hierarchy and one catalogue of error codes for the whole service.

Every error carries a stable machine-readable `code` from `ErrorCode`, a message a person can act on,
and the HTTP status the gateway answers with. `ERROR_CODES` says for each code where it appears (an
HTTP answer, a job's `error`, or both), its status and what it means; the README's error table is
checked against it. Workers store `code` and `message` on a failed job; the gateway maps the classes
to statuses in one place (`app.errors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Every code the service can answer with or end a job with."""

    # The request itself.
    INVALID_REQUEST = "invalid_request"
    INVALID_INPUT = "invalid_input"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BAD_REQUEST = "bad_request"
    CORS_REFUSED = "cors_refused"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_ACCEPTABLE = "not_acceptable"
    NOT_FOUND = "not_found"
    # Images.
    INVALID_IMAGE = "invalid_image"
    IMAGE_FILE_TOO_LARGE = "image_file_too_large"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_SMALL = "image_too_small"
    IMAGE_ASPECT_RATIO = "image_aspect_ratio"
    TOO_MANY_IMAGES = "too_many_images"
    EDIT_NEEDS_IMAGE = "edit_needs_image"
    # Parameters.
    EMPTY_INSTRUCTION = "empty_instruction"
    INSTRUCTION_TOO_LONG = "instruction_too_long"
    INVALID_STEPS = "invalid_steps"
    INVALID_GUIDANCE = "invalid_guidance"
    INVALID_SEED = "invalid_seed"
    INVALID_NUM_IMAGES = "invalid_num_images"
    INVALID_WIDTH = "invalid_width"
    INVALID_HEIGHT = "invalid_height"
    INVALID_SIZE = "invalid_size"
    SIZE_WITH_EDIT = "size_with_edit"
    MIXING_NEEDS_PROMPTS = "mixing_needs_prompts"
    MIXING_TAKES_NO_IMAGES = "mixing_takes_no_images"
    MIXING_FIELD_WITHOUT_MIXING = "mixing_field_without_mixing"
    INVALID_MIX_STEPS = "invalid_mix_steps"
    INVALID_MIX_STRENGTH = "invalid_mix_strength"
    PROMPT_TOO_LONG = "prompt_too_long"
    STEP_CACHE_NOT_ALLOWED = "step_cache_not_allowed"
    # Text tasks (judge, mixing_prompts).
    FIELD_NOT_FOR_TASK = "field_not_for_task"
    JUDGE_NEEDS_OUTPUT = "judge_needs_output"
    EMPTY_ATTRIBUTE = "empty_attribute"
    INVALID_COUNT = "invalid_count"
    TRANSLATOR_UNAVAILABLE = "translator_unavailable"
    UNUSABLE_ANSWER = "unusable_answer"
    UNKNOWN_LORA = "unknown_lora"
    LORA_NOT_FOR_TASK = "lora_not_for_task"
    INVALID_LORA_SCALE = "invalid_lora_scale"
    TOO_MANY_LORAS = "too_many_loras"
    DUPLICATE_LORA = "duplicate_lora"
    # Webhooks and idempotency.
    WEBHOOKS_UNAVAILABLE = "webhooks_unavailable"
    WEBHOOK_URL_REFUSED = "webhook_url_refused"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    IDEMPOTENCY_KEY_IN_USE = "idempotency_key_in_use"
    # Who is asking.
    UNAUTHORIZED = "unauthorized"
    MISSING_API_KEY = "missing_api_key"
    INVALID_API_KEY = "invalid_api_key"
    FORBIDDEN = "forbidden"
    LINK_INVALID = "link_invalid"
    LINK_EXPIRED = "link_expired"
    TOO_MANY_REQUESTS = "too_many_requests"
    RATE_LIMITED = "rate_limited"
    ACTIVE_JOBS_LIMIT = "active_jobs_limit"
    QUEUE_FULL = "queue_full"
    # A job's state.
    JOB_NOT_FOUND = "job_not_found"
    RESULT_EXPIRED = "result_expired"
    RESULT_INDEX = "result_index"
    JOB_NOT_FINISHED = "job_not_finished"
    JOB_FINISHED = "job_finished"
    JOB_FAILED = "job_failed"
    JOB_CANCELED = "job_canceled"
    CONFLICT = "conflict"
    # How a job ended, when it did not succeed.
    CANCELED = "canceled"
    DEADLINE = "deadline"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    WORKER_LOST = "worker_lost"
    LEASE_LOST = "lease_lost"
    LORA_UNAVAILABLE = "lora_unavailable"
    # The service.
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class Where(StrEnum):
    """Where a code appears: an HTTP error answer, a job's `error`, or both."""

    HTTP = "http"
    JOB = "job"
    BOTH = "http, job"


@dataclass(frozen=True)
class CodeInfo:
    status: int
    where: Where
    meaning: str


_I, _H, _J, _B = 422, Where.HTTP, Where.JOB, Where.BOTH
#: The catalogue: every code, where it appears, its HTTP status, and what it means.
ERROR_CODES: dict[ErrorCode, CodeInfo] = {
    ErrorCode.INVALID_REQUEST: CodeInfo(_I, _H, "a field, header or the body is malformed; details name it"),
    ErrorCode.INVALID_INPUT: CodeInfo(_I, _B, "the request cannot be run as given"),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: CodeInfo(415, _H, "the body is neither multipart/form-data nor JSON"),
    ErrorCode.PAYLOAD_TOO_LARGE: CodeInfo(413, _H, "the whole request body is over its byte limit"),
    ErrorCode.BAD_REQUEST: CodeInfo(400, _H, "the HTTP request could not be understood"),
    ErrorCode.CORS_REFUSED: CodeInfo(
        400, _H, "a browser preflight from an origin, method or header DREAMOMNI2_CORS_ORIGINS does not allow"
    ),
    ErrorCode.METHOD_NOT_ALLOWED: CodeInfo(405, _H, "the route does not take this method"),
    ErrorCode.NOT_ACCEPTABLE: CodeInfo(406, _H, "no representation matches the Accept header"),
    ErrorCode.NOT_FOUND: CodeInfo(404, _H, "no such route"),
    ErrorCode.INVALID_IMAGE: CodeInfo(_I, _B, "an image is empty, not a known format, truncated or corrupt"),
    ErrorCode.IMAGE_FILE_TOO_LARGE: CodeInfo(413, _B, "an image file is over DREAMOMNI2_MAX_IMAGE_BYTES"),
    ErrorCode.IMAGE_TOO_LARGE: CodeInfo(_I, _B, "an image has more pixels than DREAMOMNI2_MAX_IMAGE_PIXELS"),
    ErrorCode.IMAGE_TOO_SMALL: CodeInfo(_I, _B, "an image side is under DREAMOMNI2_MIN_IMAGE_SIDE"),
    ErrorCode.IMAGE_ASPECT_RATIO: CodeInfo(_I, _B, "an image is more elongated than allowed"),
    ErrorCode.TOO_MANY_IMAGES: CodeInfo(_I, _B, "more images than DREAMOMNI2_MAX_IMAGES"),
    ErrorCode.EDIT_NEEDS_IMAGE: CodeInfo(_I, _B, "task=edit with no image to edit"),
    ErrorCode.EMPTY_INSTRUCTION: CodeInfo(_I, _B, "the instruction is empty or blank"),
    ErrorCode.INSTRUCTION_TOO_LONG: CodeInfo(_I, _B, "the instruction is over its character limit"),
    ErrorCode.INVALID_STEPS: CodeInfo(_I, _B, "steps is outside DREAMOMNI2_MIN_STEPS..DREAMOMNI2_MAX_STEPS"),
    ErrorCode.INVALID_GUIDANCE: CodeInfo(_I, _B, "guidance is outside its range"),
    ErrorCode.INVALID_SEED: CodeInfo(_I, _B, "seed is outside 0..2^53-1"),
    ErrorCode.INVALID_NUM_IMAGES: CodeInfo(
        _I, _B, "num_images is outside 1..DREAMOMNI2_MAX_NUM_IMAGES, or sent with feature_mixing"
    ),
    ErrorCode.INVALID_WIDTH: CodeInfo(_I, _B, "width is outside DREAMOMNI2_MIN_SIZE..DREAMOMNI2_MAX_SIZE"),
    ErrorCode.INVALID_HEIGHT: CodeInfo(_I, _B, "height is outside DREAMOMNI2_MIN_SIZE..DREAMOMNI2_MAX_SIZE"),
    ErrorCode.INVALID_SIZE: CodeInfo(_I, _B, "the requested size is longer than DREAMOMNI2_MAX_ASPECT_RATIO"),
    ErrorCode.SIZE_WITH_EDIT: CodeInfo(_I, _B, "width/height sent with an edit (they are for generation)"),
    ErrorCode.MIXING_NEEDS_PROMPTS: CodeInfo(_I, _B, "feature_mixing without both prompts"),
    ErrorCode.MIXING_TAKES_NO_IMAGES: CodeInfo(_I, _B, "images sent with feature_mixing"),
    ErrorCode.MIXING_FIELD_WITHOUT_MIXING: CodeInfo(
        _I, _B, "a Feature Mixing field (prompts, attribute, mix_*) sent with another task"
    ),
    ErrorCode.INVALID_MIX_STEPS: CodeInfo(_I, _B, "mix_steps is outside 0..1"),
    ErrorCode.INVALID_MIX_STRENGTH: CodeInfo(_I, _B, "mix_strength is outside 0..1"),
    ErrorCode.PROMPT_TOO_LONG: CodeInfo(_I, _B, "a Feature Mixing prompt or attribute is over its limit"),
    ErrorCode.STEP_CACHE_NOT_ALLOWED: CodeInfo(_I, _B, "step_cache names a policy not allowed here"),
    ErrorCode.FIELD_NOT_FOR_TASK: CodeInfo(
        _I, _B, "a field sent with a task that does not use it (steps with judge, count with edit, ...)"
    ),
    ErrorCode.JUDGE_NEEDS_OUTPUT: CodeInfo(_I, _B, "task=judge without images: the last is the output"),
    ErrorCode.EMPTY_ATTRIBUTE: CodeInfo(_I, _B, "task=mixing_prompts without an attribute keyword"),
    ErrorCode.INVALID_COUNT: CodeInfo(_I, _B, "count is outside 1..DREAMOMNI2_MAX_MIXING_PROMPTS"),
    ErrorCode.TRANSLATOR_UNAVAILABLE: CodeInfo(
        _I, _B, "judge or mixing_prompts on a deployment without the language model (DREAMOMNI2_TRANSLATOR)"
    ),
    ErrorCode.UNUSABLE_ANSWER: CodeInfo(
        502, _J, "mixing_prompts: the language model's answer did not parse; details.raw holds it"
    ),
    ErrorCode.UNKNOWN_LORA: CodeInfo(_I, _B, "`loras` names a LoRA this deployment has not registered"),
    ErrorCode.LORA_NOT_FOR_TASK: CodeInfo(_I, _B, "`loras` names a LoRA not registered for the job's task"),
    ErrorCode.INVALID_LORA_SCALE: CodeInfo(_I, _B, "a LoRA's scale is outside -4..4"),
    ErrorCode.TOO_MANY_LORAS: CodeInfo(_I, _B, "more LoRAs than DREAMOMNI2_MAX_LORAS_PER_JOB"),
    ErrorCode.DUPLICATE_LORA: CodeInfo(_I, _B, "`loras` names the same LoRA twice"),
    ErrorCode.WEBHOOKS_UNAVAILABLE: CodeInfo(_I, _H, "webhook_url sent, but no signing secret is configured"),
    ErrorCode.WEBHOOK_URL_REFUSED: CodeInfo(_I, _H, "webhook_url is not a public http(s) destination"),
    ErrorCode.IDEMPOTENCY_KEY_REUSED: CodeInfo(_I, _H, "the Idempotency-Key was used with a different body"),
    ErrorCode.IDEMPOTENCY_KEY_IN_USE: CodeInfo(409, _H, "the first request with this key is still running"),
    ErrorCode.UNAUTHORIZED: CodeInfo(401, _H, "authentication failed"),
    ErrorCode.MISSING_API_KEY: CodeInfo(401, _H, "no `Authorization: Bearer <key>` header"),
    ErrorCode.INVALID_API_KEY: CodeInfo(401, _H, "the API key is not known"),
    ErrorCode.FORBIDDEN: CodeInfo(403, _H, "not allowed"),
    ErrorCode.LINK_INVALID: CodeInfo(403, _H, "a signed result link not issued by this service, or altered"),
    ErrorCode.LINK_EXPIRED: CodeInfo(410, _H, "a signed result link past its expiry: get a fresh one"),
    ErrorCode.TOO_MANY_REQUESTS: CodeInfo(429, _H, "slow down"),
    ErrorCode.RATE_LIMITED: CodeInfo(429, _H, "this API key submitted faster than its rate limit allows"),
    ErrorCode.ACTIVE_JOBS_LIMIT: CodeInfo(429, _H, "this API key has its maximum of jobs queued or running"),
    ErrorCode.QUEUE_FULL: CodeInfo(429, _H, "the service's queue is at its cap; try again later"),
    ErrorCode.JOB_NOT_FOUND: CodeInfo(404, _H, "no such job for this API key, or it expired"),
    ErrorCode.RESULT_EXPIRED: CodeInfo(404, _H, "the job succeeded but its image has expired"),
    ErrorCode.RESULT_INDEX: CodeInfo(404, _H, "`?index=` names a result image the job does not have"),
    ErrorCode.JOB_NOT_FINISHED: CodeInfo(409, _H, "the job is queued or running: no result yet"),
    ErrorCode.JOB_FINISHED: CodeInfo(409, _H, "the job already ended: it cannot be canceled"),
    ErrorCode.JOB_FAILED: CodeInfo(409, _H, "the job failed: it has no result (its error says why)"),
    ErrorCode.JOB_CANCELED: CodeInfo(409, _H, "the job was canceled: it has no result"),
    ErrorCode.CONFLICT: CodeInfo(409, _H, "the job is not in a state that allows this"),
    ErrorCode.CANCELED: CodeInfo(409, _J, "canceled at its owner's request"),
    ErrorCode.DEADLINE: CodeInfo(409, _J, "no worker started it before deadline_s / Cancel-After"),
    ErrorCode.TIMEOUT: CodeInfo(504, _J, "it ran longer than DREAMOMNI2_JOB_TIMEOUT_S"),
    ErrorCode.OUT_OF_MEMORY: CodeInfo(507, _J, "the GPU or the host ran out of memory for it"),
    ErrorCode.WORKER_LOST: CodeInfo(500, _J, "its worker died DREAMOMNI2_MAX_ATTEMPTS times"),
    ErrorCode.LEASE_LOST: CodeInfo(500, _J, "internal: a run lost its lease to another run (never stored)"),
    ErrorCode.LORA_UNAVAILABLE: CodeInfo(
        503, _J, "a LoRA it names changed or went missing on disk since the workers started; restart them"
    ),
    ErrorCode.UNAVAILABLE: CodeInfo(
        503, _H, "the job store (Redis) is unreachable, or a new job could not reach its replicas; retry"
    ),
    ErrorCode.INTERNAL: CodeInfo(500, _B, "an unexpected error; it is in the logs"),
}  # fmt: skip


def error_table() -> str:
    """The README's error table (Markdown), from the catalogue."""
    rows = ["| code | HTTP | appears in | meaning |", "|---|---|---|---|"]
    for code, info in ERROR_CODES.items():
        rows.append(f"| `{code.value}` | {info.status} | {info.where.value} | {info.meaning} |")
    return "\n".join(rows)


#: The code of an error answer that carries no code of its own, by HTTP status: what the gateway
#: answers for the errors Starlette raises itself (unknown route, wrong method, ...), and what a
#: client reads from an answer without the envelope (a proxy's page, say).
STATUS_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    406: ErrorCode.NOT_ACCEPTABLE,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.INVALID_INPUT,
    429: ErrorCode.TOO_MANY_REQUESTS,
    502: ErrorCode.UNAVAILABLE,
    503: ErrorCode.UNAVAILABLE,
    504: ErrorCode.UNAVAILABLE,
}


class ServiceError(Exception):
    """Base of every error the service reports to a caller."""

    code: ErrorCode = ErrorCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str, *, code: ErrorCode | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            # A code outside the catalogue is a bug: fail where it is made, not in a caller's parser.
            self.code = ErrorCode(code)
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidInput(ServiceError):
    """The request cannot be run as given; the message names the problem and the limit."""

    code = ErrorCode.INVALID_INPUT
    http_status = 422


class PayloadTooLarge(InvalidInput):
    """An upload, or the whole request, is over a byte limit."""

    code = ErrorCode.PAYLOAD_TOO_LARGE
    http_status = 413


class Unauthorized(ServiceError):
    code = ErrorCode.UNAUTHORIZED
    http_status = 401


class LinkInvalid(ServiceError):
    """A signed result link whose signature does not match: forged, or a part of it changed."""

    code = ErrorCode.LINK_INVALID
    http_status = 403


class LinkExpired(ServiceError):
    """A signed result link this service issued, past its expiry."""

    code = ErrorCode.LINK_EXPIRED
    http_status = 410


class NotFound(ServiceError):
    code = ErrorCode.NOT_FOUND
    http_status = 404


class Conflict(ServiceError):
    code = ErrorCode.CONFLICT
    http_status = 409


class UnsupportedMediaType(ServiceError):
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE
    http_status = 415


class TranslatorUnavailable(InvalidInput):
    """A text task (judge, mixing_prompts) on a deployment, or a worker, without the language model."""

    code = ErrorCode.TRANSLATOR_UNAVAILABLE


class UnusableAnswer(ServiceError):
    """The language model's answer could not be used (it did not parse); `details.raw` holds it."""

    code = ErrorCode.UNUSABLE_ANSWER
    http_status = 502


class ServiceUnavailable(ServiceError):
    """A dependency of the service (the queue) is unreachable."""

    code = ErrorCode.UNAVAILABLE
    http_status = 503


class TooManyRequests(ServiceError):
    """A quota refuses the request for now; `headers` say when to retry and which limit it was."""

    code = ErrorCode.TOO_MANY_REQUESTS
    http_status = 429

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message, code=code, details=details)
        self.headers = headers or {}


class ModelOutOfMemory(ServiceError):
    """The accelerator ran out of memory for this job; smaller inputs may fit."""

    code = ErrorCode.OUT_OF_MEMORY
    http_status = 507


class LoraUnavailable(ServiceError):
    """A registered LoRA's file changed or went missing after the worker read it at start."""

    code = ErrorCode.LORA_UNAVAILABLE
    http_status = 503


class JobCanceled(ServiceError):
    """The job was canceled (by its owner or its deadline) before it finished."""

    code = ErrorCode.CANCELED
    http_status = 409


class JobTimeout(ServiceError):
    """The job ran past `DREAMOMNI2_JOB_TIMEOUT_S` and was stopped."""

    code = ErrorCode.TIMEOUT
    http_status = 504


class LeaseLost(ServiceError):
    """This run's lease lapsed and the job was handed to another run: stop, write nothing."""

    code = ErrorCode.LEASE_LOST

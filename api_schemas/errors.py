"""One error hierarchy for the whole service.

Every error carries a stable machine-readable `code`, a message a person can act on, and the HTTP
status the gateway answers with. Workers store `code` and `message` on a failed job; the gateway maps
the classes to statuses in one place (`app.errors`).
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the service reports to a caller."""

    code: str = "internal"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidInput(ServiceError):
    """The request cannot be run as given; the message names the problem and the limit."""

    code = "invalid_input"
    http_status = 422


class PayloadTooLarge(InvalidInput):
    """An upload, or the whole request, is over a byte limit."""

    code = "payload_too_large"
    http_status = 413


class Unauthorized(ServiceError):
    code = "unauthorized"
    http_status = 401


class NotFound(ServiceError):
    code = "not_found"
    http_status = 404


class Conflict(ServiceError):
    code = "conflict"
    http_status = 409


class ModelOutOfMemory(ServiceError):
    """The accelerator ran out of memory for this job; smaller inputs may fit."""

    code = "out_of_memory"
    http_status = 507


class JobCanceled(ServiceError):
    """The job was canceled (by its owner or its deadline) before it finished."""

    code = "canceled"
    http_status = 409


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"
    http_status = 415

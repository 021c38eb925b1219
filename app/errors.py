"""One place that turns every error into the envelope `{"error": {"code", "message", ...}}`."""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api_schemas.api import ErrorEnvelope
from api_schemas.errors import STATUS_CODES, ErrorCode, ServiceError
from app.request_id import current_request_id

logger = logging.getLogger(__name__)

#: Seconds a 503 asks the client to wait (`Retry-After`): Redis restarts or fails over in seconds.
RETRY_AFTER_S = 2

#: For OpenAPI: every documented error response has the envelope's shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": description}
    for status, description in {
        401: "Missing or unknown API key.",
        404: "No such job for this API key (or it expired).",
        409: "The job is not in a state that allows this.",
        413: "An image or the whole request is over its byte limit.",
        422: "The request is invalid; the message says what and the limit.",
        503: "Redis is unreachable.",
    }.items()
}


def _json_safe(value: object) -> object:
    """`value` with every non-finite float as text: JSON has no NaN or infinity, and an error body that
    cannot be encoded would turn a refusal into a 500 and a dropped connection."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def error_body(code: ErrorCode, message: str, details: object = None) -> dict[str, Any]:
    """The envelope, with the id of the request being answered (`X-Request-ID`)."""
    body: dict[str, Any] = {"code": code.value, "message": message}
    if details:
        body["details"] = _json_safe(details)
    if request_id := current_request_id():
        body["request_id"] = request_id
    return {"error": body}


def error_response(
    status: int, code: ErrorCode, message: str, details: object = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
        if exc.http_status == 503:
            headers = {"Retry-After": str(RETRY_AFTER_S)}
        headers = {**(headers or {}), **getattr(exc, "headers", {})} or None
        return error_response(exc.http_status, exc.code, exc.message, exc.details or None, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
            problems.append({"field": where, "problem": error.get("msg", "invalid")})
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems) or "invalid request"
        return error_response(
            422, ErrorCode.INVALID_REQUEST, f"The request is invalid: {summary}.", {"errors": problems}
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(
            exc.status_code, ErrorCode.BAD_REQUEST if exc.status_code < 500 else ErrorCode.INTERNAL
        )
        message = exc.detail if isinstance(exc.detail, str) else code.value.replace("_", " ")
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    # Its own handler, not a branch of the catch-all below: Starlette re-raises whatever reaches the
    # catch-all after answering, so the server would log a traceback and drop the connection.
    @app.exception_handler(redis.RedisError)
    async def store_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
        logger.error("Redis error on %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503,
            ErrorCode.UNAVAILABLE,
            f"The job store (Redis) is unreachable; try again in {RETRY_AFTER_S} s.",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, ErrorCode.INTERNAL, "Unexpected error; it has been logged.")

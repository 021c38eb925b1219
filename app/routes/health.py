"""Operations: liveness, readiness, metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request, Response, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api_schemas.api import Readiness
from app.auth import BEARER
from app.dependencies import Service
from app.errors import ERROR_RESPONSES, RETRY_AFTER_S
from app.service_info import readiness

health_router = APIRouter(tags=["operations"])


@health_router.get("/healthz", operation_id="healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """200 while the process serves requests; depends on nothing else."""
    return {"status": "ok"}


@health_router.get(
    "/readyz",
    operation_id="readyz",
    summary="Readiness",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": "Redis is unreachable.",
            "headers": {
                "Retry-After": {
                    "description": "Seconds to wait before asking again.",
                    "schema": {"type": "integer"},
                }
            },
        }
    },
)
def readyz(
    request: Request,
    service: Service,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> Response:
    """200 when this gateway can take jobs (Redis reachable). Workers may scale to zero, so they do not
    count; the body says how many are up, how many have their models loaded, their memory modes, and
    how many serve a fallback because their speed profile could not be applied (`speed_fallbacks`).

    With API keys on, those details (and Redis's error) are for callers with a key; a probe without
    one gets the status alone."""
    body, ready = readiness(service)
    if not request.app.state.keys.knows(credentials):
        body = Readiness(status=body.status, redis="ok" if ready else "unreachable")
    if ready:
        return JSONResponse(body.model_dump(mode="json", exclude_none=True))
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=503, headers=headers)


@health_router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    response_class=Response,  # so the 401 is declared as the JSON it is, the 200 as text
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text format."},
        401: ERROR_RESPONSES[401],
    },
)
def metrics(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]
) -> Response:
    """Prometheus text format: requests, latency, submissions, queue depth, workers.

    With API keys on, a scraper sends one (`Authorization: Bearer <key>`): the numbers describe every
    key's traffic."""
    request.app.state.keys.owner(credentials)  # 401 without a known key (auth on)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""`/v1/service`: what the deployment allows, for clients to read before they submit (the web page does)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api_schemas.api import ServiceInfo
from app.dependencies import Service
from app.service_info import describe_service

service_router = APIRouter(prefix="/v1", tags=["service"])


@service_router.get(
    "/service", operation_id="get_service_info", summary="Limits and choices", response_model=ServiceInfo
)
def service_info(request: Request, service: Service) -> ServiceInfo:
    """Whether API keys are required, the limits every request is checked against, and the values
    `output_format` and `step_cache` take here. Public (no key needed) and read-only; no secrets."""
    return describe_service(service, auth_required=request.app.state.keys.enabled)

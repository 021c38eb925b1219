"""OpenAI-compatible routes: `/v1/images/generations`, `/v1/images/edits`, `/v1/models`.

Thin: each hands its call to `app.openai_images`, where it becomes a native
job (the same checks, quotas, idempotency and metrics) answered in OpenAI's shapes.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.responses import Response

from api_schemas.common import Task
from api_schemas.openai import (
    MODEL_ID,
    ImageRequest,
    ImagesResponse,
    Model,
    ModelList,
    OpenAIErrorEnvelope,
)
from app.auth import BEARER
from app.dependencies import BaseUrl, Service
from app.openai_images import answer, check_model, create_images

openai_router = APIRouter(prefix="/v1", tags=["openai"])

Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]

OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIErrorEnvelope, "description": description}
    for status, description in {
        400: "Invalid request (`param` names the field).",
        401: "Missing or unknown API key.",
        404: "Unknown model.",
        409: "The job failed on the service's side or was canceled; the message names the job (never "
        "retried: `x-should-retry: false`).",
        429: "A quota: `Retry-After` says when to try again.",
        503: "Redis is unreachable.",
        408: "The job did not end within DREAMOMNI2_MAX_WAIT_S; the message names the job to fetch later.",
    }.items()
}


# Models --------------------------------------------------------------------------------------------
@openai_router.get(
    "/models",
    operation_id="list_models",
    summary="List models (OpenAI)",
    response_model=ModelList,
    responses=OPENAI_ERRORS,
)
async def list_models(request: Request, credentials: Credentials) -> Response:
    """The model ids served: `dreamomni2`."""

    async def work() -> Response:
        request.app.state.keys.owner(credentials)
        return JSONResponse(ModelList(data=[Model(id=MODEL_ID)]).model_dump())

    return await answer(work)


@openai_router.get(
    "/models/{model_id}",
    operation_id="get_model",
    summary="Get a model (OpenAI)",
    response_model=Model,
    responses=OPENAI_ERRORS,
)
async def get_model(model_id: str, request: Request, credentials: Credentials) -> Response:
    """The model object; 404 `model_not_found` for any id but `dreamomni2`."""

    async def work() -> Response:
        request.app.state.keys.owner(credentials)
        check_model(model_id)
        return JSONResponse(Model(id=MODEL_ID).model_dump())

    return await answer(work)


GENERATION_SCHEMA = ImageRequest.model_json_schema(ref_template="#/components/schemas/{model}")
GENERATION_SCHEMA.pop("$defs", None)


#: The image routes' 200: the ImagesResponse, or with `stream: true` the events.
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "The images; with `stream: true`, Server-Sent Events (`*.partial_image`, then "
        "`*.completed` per image, or `error`).",
    },
    **OPENAI_ERRORS,
}


# Images --------------------------------------------------------------------------------------------
@openai_router.post(
    "/images/generations",
    operation_id="openai_create_image",
    summary="Create an image (OpenAI)",
    response_model=ImagesResponse,
    responses=IMAGE_RESPONSES,
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": GENERATION_SCHEMA}}}
    },
)
async def create_image(
    request: Request, service: Service, credentials: Credentials, base_url: BaseUrl
) -> Response:
    """OpenAI's image generation: a `generate` job, held until it ends. `stream: true` answers
    `image_generation.partial_image` events (live previews) then `image_generation.completed`."""
    return await create_images(request, service, credentials, base_url, Task.GENERATE)


@openai_router.post(
    "/images/edits",
    operation_id="openai_edit_image",
    summary="Edit images (OpenAI)",
    response_model=ImagesResponse,
    responses=IMAGE_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image", "prompt"],
                        "properties": {
                            "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            "prompt": {"type": "string"},
                        },
                    }
                }
            },
        }
    },
)
async def edit_image(
    request: Request, service: Service, credentials: Credentials, base_url: BaseUrl
) -> Response:
    """OpenAI's image edit: `image` or `image[]` (image 1 first, then references) and the fields of a
    generation; an `edit` job, held until it ends. `stream: true` answers `image_edit.*` events."""
    return await create_images(request, service, credentials, base_url, Task.EDIT)

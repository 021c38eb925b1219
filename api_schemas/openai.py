"""The OpenAI-compatible surface (`/v1/images/*`, `/v1/models`): requests, answers and error envelope in
OpenAI's shapes, so the official SDKs work against the gateway unchanged."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from api_schemas.api import OutputFormat
from api_schemas.loras import LoraChoices

#: The model id the gateway serves (`model` in a request; `GET /v1/models`).
MODEL_ID = "dreamomni2"
#: OpenAI's fixed `created` of the model object (the service's first release, 2025-10-01 UTC).
MODEL_CREATED = 1759276800
#: Most `partial_images` OpenAI accepts.
MAX_PARTIAL_IMAGES = 3


class OpenAICode(StrEnum):
    """The `code` of an OpenAI-shaped refusal where ours has none to lend (ours, `ErrorCode`, otherwise)."""

    INVALID_API_KEY = "invalid_api_key"
    INVALID_CONTENT_TYPE = "invalid_content_type"
    INVALID_VALUE = "invalid_value"
    MODEL_NOT_FOUND = "model_not_found"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"


class ImageRequest(BaseModel):
    """`POST /v1/images/generations` (JSON) and the form fields of `POST /v1/images/edits`."""

    # Unknown fields and non-finite numbers are refused, as in the native API.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(description="What to draw or change; images are referred to as image 1, 2, ...")
    model: str | None = Field(default=None, description=f"`{MODEL_ID}` (the default).")
    n: int | None = Field(default=None, description="Images to make; 1 unless the deployment makes more.")
    size: str | None = Field(
        default=None,
        description="`auto` (the default) or `WxH`: generations only (an edit keeps image 1's aspect ratio).",
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        default=None, description="`b64_json` (the default) or `url` (a signed, expiring link)."
    )
    output_format: OutputFormat | None = Field(default=None, description="`png` (default), `jpeg` or `webp`.")
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="Accepted for compatibility (0..100); not used."
    )
    stream: bool | None = Field(default=None, description="Answer Server-Sent Events.")
    partial_images: int | None = Field(
        default=None, ge=0, le=MAX_PARTIAL_IMAGES, description="Live previews to stream before the image."
    )
    user: str | None = Field(default=None, max_length=256, description="Accepted for compatibility.")
    # OpenAI's quality knobs, accepted as `auto` only so an SDK default passes.
    quality: Literal["auto"] | None = None
    background: Literal["auto"] | None = None
    moderation: Literal["auto"] | None = None
    # Ours, sent as an extra body field (the SDKs' `extra_body`): the native API's `loras`.
    loras: LoraChoices = Field(
        default=None,
        description="Registered LoRAs to stack, as in `POST /v1/jobs`: "
        '`[{"name": "my-style", "scale": 0.8}]` (in an edit\'s form: that JSON as text).',
    )


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = Field(default=None, description="The prompt the model was sampled with.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str
    background: Literal["opaque"] = "opaque"
    quality: Literal["auto"] = "auto"


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorEnvelope(BaseModel):
    """Every refusal of the OpenAI-compatible routes."""

    error: OpenAIError


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = MODEL_CREATED
    owned_by: str = "dreamomni2-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]

"""The OpenAPI parts FastAPI cannot infer: the submit route reads its body itself (multipart or JSON)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from api_schemas.api import JobOptions, JobRequestJSON
from api_schemas.common import WebhookEvent

DESCRIPTION = """
Multimodal instruction-based image editing and generation with DreamOmni2 (FLUX.1 Kontext +
DreamOmni2 LoRAs + a Qwen2.5-VL instruction translator).

Submit images and a plain-words instruction (`POST /v1/jobs`), then poll the job
(`GET /v1/jobs/{id}`) or hold the request with `Prefer: wait=N`, and download the image
(`GET /v1/jobs/{id}/result`). Every error has the shape `{"error": {"code", "message", "details"}}`.
Authenticate with `Authorization: Bearer <key>` when the deployment has API keys.
"""

_FORM_FIELDS = {
    name: {"type": "string", "description": field.description or ""}
    for name, field in JobOptions.model_fields.items()
}
_MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["instruction"],
    "properties": {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Repeat the field; the order is image 1..n. Image 1 is the one to edit.",
        },
        **_FORM_FIELDS,
        "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"], "default": "png"},
        "webhook_events": {
            "type": "array",
            "items": {"type": "string", "enum": [e.value for e in WebhookEvent]},
            "description": "Repeat the field (or comma-separate): started, progress, completed.",
        },
    },
}
#: The request body of `POST /v1/jobs`, in both encodings.
SUBMIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {
                "schema": {"$ref": "#/components/schemas/JobRequestJSON"},
                "example": JobRequestJSON.model_config["json_schema_extra"]["example"],
            },
        },
    },
}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document plus the JSON body schema that `POST /v1/jobs` refers to by `$ref`."""
    if app.openapi_schema is None:
        document = FastAPI.openapi(app)
        body = JobRequestJSON.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in body.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas["JobRequestJSON"] = body
    return app.openapi_schema

"""The OpenAPI parts FastAPI cannot infer: the submit route reads its body itself (multipart or JSON)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from api_schemas.api import JobOptions, JobRequestJSON
from api_schemas.common import MAX_SEED
from api_schemas.jobs import JobLimits

DESCRIPTION = """
Multimodal instruction-based image editing and generation with DreamOmni2 (FLUX.1 Kontext +
DreamOmni2 LoRAs + a Qwen2.5-VL instruction translator).

Submit images and a plain-words instruction (`POST /v1/jobs`), then poll the job
(`GET /v1/jobs/{id}`) or hold the request with `Prefer: wait=N`, and download the image
(`GET /v1/jobs/{id}/result`). Every error has the shape `{"error": {"code", "message", "details"}}`.
Authenticate with `Authorization: Bearer <key>` when the deployment has API keys.
"""

_MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["instruction"],
    "properties": {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Repeat the field; the order is image 1..n. Image 1 is the one to edit.",
        },
        # The other fields: JobOptions' own schema (typed, with this deployment's ranges), filled in
        # by `openapi_document`.
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


def _ranges(limits: JobLimits) -> dict[str, dict[str, Any]]:
    """The deployment's limits as JSON Schema keywords, so a client (or a fuzzer) knows the ranges."""
    return {
        "instruction": {"minLength": 1, "maxLength": limits.max_instruction_chars},
        "seed": {"minimum": 0, "maximum": MAX_SEED},
        "steps": {"minimum": limits.min_steps, "maximum": limits.max_steps},
        "guidance": {"minimum": limits.min_guidance, "maximum": limits.max_guidance},
        "width": {"minimum": limits.min_size, "maximum": limits.max_size},
        "height": {"minimum": limits.min_size, "maximum": limits.max_size},
        "images": {"maxItems": limits.max_images},
    }


def _with_range(schema: dict[str, Any], keywords: dict[str, Any]) -> dict[str, Any]:
    """`schema` with `keywords` on its non-null variant (an optional field is `anyOf [T, null]`)."""
    if "anyOf" in schema:
        variants = [v if v.get("type") == "null" else {**v, **keywords} for v in schema["anyOf"]]
        return {**schema, "anyOf": variants}
    return {**schema, **keywords}


def openapi_document(app: FastAPI, limits: JobLimits) -> dict[str, Any]:
    """FastAPI's OpenAPI document plus what it cannot infer: the body schemas of `POST /v1/jobs` (the
    route reads its body itself), typed and with the deployment's ranges in both encodings."""
    if app.openapi_schema is None:
        document = FastAPI.openapi(app)
        ranges = _ranges(limits)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        body = JobRequestJSON.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in body.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        body["properties"] = {
            name: _with_range(field, ranges.get(name, {})) for name, field in body["properties"].items()
        }
        schemas["JobRequestJSON"] = body
        form = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
        options = JobOptions.model_json_schema(ref_template="#/components/schemas/{model}")["properties"]
        form["schema"]["properties"] = {
            "images": {**form["schema"]["properties"]["images"], **ranges["images"]},
            **{name: _with_range(field, ranges.get(name, {})) for name, field in options.items()},
        }
        # Multipart sends each webhook event as its own part (or comma-separated in one).
        form["encoding"] = {"webhook_events": {"style": "form", "explode": True}}
    return app.openapi_schema

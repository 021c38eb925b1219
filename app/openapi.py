"""The OpenAPI parts FastAPI cannot infer: the submit route reads its body itself (multipart or JSON)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from api_schemas.api import JobOptions, JobRequestJSON
from api_schemas.common import MAX_SEED, Task
from api_schemas.jobs import JobLimits

DESCRIPTION = """
Multimodal instruction-based image editing and generation with DreamOmni2 (FLUX.1 Kontext +
DreamOmni2 LoRAs + a Qwen2.5-VL instruction translator).

Submit images and a plain-words instruction (`POST /v1/jobs`), then poll the job
(`GET /v1/jobs/{id}`) or hold the request with `Prefer: wait=N`, and download the image
(`GET /v1/jobs/{id}/result`), or hand out its signed link (`result.signed_url`, `GET /v1/results/{id}`),
which downloads without a key until it expires. The text tasks (`task` `judge`: score an output image;
`mixing_prompts`: write Feature Mixing prompt pairs) return JSON, the job object's `output`.
Every error has the shape
`{"error": {"code", "message", "details", "request_id"}}`. Every answer has an `X-Request-ID` header:
the caller's own (up to 128 letters, digits and `._:/+=@-`) or a new one.
Authenticate with `Authorization: Bearer <key>` when the deployment has API keys (every `/v1` call but a
signed link).
"""

_MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Repeat the field; the order is image 1..n. Image 1 is the one to edit. "
            "task=judge: the case's input images in order, then the output image to judge, last.",
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
        "source_prompt": {"minLength": 1, "maxLength": limits.max_instruction_chars},
        "target_prompt": {"minLength": 1, "maxLength": limits.max_instruction_chars},
        "attribute": {"maxLength": limits.max_instruction_chars},
        "mix_steps": {"minimum": 0, "maximum": 1},
        "mix_strength": {"minimum": 0, "maximum": 1},
        "seed": {"minimum": 0, "maximum": MAX_SEED},
        "steps": {"minimum": limits.min_steps, "maximum": limits.max_steps},
        "num_images": {"minimum": 1, "maximum": limits.max_num_images},
        "guidance": {"minimum": limits.min_guidance, "maximum": limits.max_guidance},
        "width": {"minimum": limits.min_size, "maximum": limits.max_size},
        "height": {"minimum": limits.min_size, "maximum": limits.max_size},
        "images": {"maxItems": limits.max_images_for(Task.JUDGE)},  # a judge: the inputs, then the output
        "count": {"minimum": 1, "maximum": limits.max_mixing_prompts},
    }


def _with_range(schema: dict[str, Any], keywords: dict[str, Any]) -> dict[str, Any]:
    """`schema` with `keywords` on its non-null variant (an optional field is `anyOf [T, null]`)."""
    if "anyOf" in schema:
        variants = [v if v.get("type") == "null" else {**v, **keywords} for v in schema["anyOf"]]
        return {**schema, "anyOf": variants}
    return {**schema, **keywords}


#: What the headers accept, as the gateway checks them (`app.headers`).
_HEADER_FORMATS: dict[str, dict[str, Any]] = {
    "last-event-id": {"pattern": r"^\d{1,20}(-\d{1,20})?$"},
    "cancel-after": {"pattern": r"^\d*\.?\d+$"},
    "idempotency-key": {"pattern": r"\S", "minLength": 1},
}


def _header_schema(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A header's schema: a string (a header is never null, only absent), with its format."""
    flat = {key: value for key, value in schema.items() if key != "anyOf"}
    for variant in schema.get("anyOf", []):
        if variant.get("type") != "null":
            flat = {**variant, **flat}
    return {**flat, "type": "string", **_HEADER_FORMATS.get(name, {})}


def _form_field(schema: dict[str, Any], keywords: dict[str, Any]) -> dict[str, Any]:
    """A multipart field: no null variant (a part left out is "not set"; a part cannot be null)."""
    ranged = _with_range(schema, keywords)
    variants = [v for v in ranged.pop("anyOf", []) if v.get("type") != "null"]
    if len(variants) == 1:
        ranged = {**variants[0], **ranged}
    elif variants:
        ranged["anyOf"] = variants
    if "default" in ranged and ranged["default"] is None:
        del ranged["default"]
    return ranged


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
            **{name: _form_field(field, ranges.get(name, {})) for name, field in options.items()},
        }
        # Multipart sends each webhook event as its own part (or comma-separated in one).
        form["encoding"] = {"webhook_events": {"style": "form", "explode": True}}
        for path in document["paths"].values():
            for operation in path.values():
                for parameter in operation.get("parameters", []):
                    if parameter["in"] == "header":
                        parameter["schema"] = _header_schema(parameter["name"], parameter["schema"])
    return app.openapi_schema

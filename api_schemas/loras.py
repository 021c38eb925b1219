"""Operator-registered LoRAs: the registry (`DREAMOMNI2_LORAS`), a request's `loras`, and their checks.

The operator registers each LoRA by name with its file (read by the workers at start, never fetched
per request); a request names registered LoRAs only, each with a scale. The gateway and the workers
check a request against the same registry, so an unknown name, a LoRA not made for the job's task or
a scale out of range is a 422 before anything is queued.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_settings import NoDecode

from api_schemas.common import Task
from api_schemas.errors import ErrorCode, InvalidInput

#: The scales a request (or the registry's default) may give a LoRA. Negative scales run a LoRA
#: backwards (slider LoRAs are trained for it); past 4 any LoRA we know of only burns the image.
MIN_LORA_SCALE = -4.0
MAX_LORA_SCALE = 4.0
#: A registered name: letters, digits, `_`, `-` and `.`, starting with a letter or a digit.
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: The tasks a registered LoRA serves when its entry names none.
DEFAULT_LORA_TASKS = (Task.EDIT, Task.GENERATE)
#: The tasks a LoRA may be registered for: those that sample FLUX.
LORA_TASKS = (Task.EDIT, Task.GENERATE, Task.FEATURE_MIXING)


def _finite_scale(value: float) -> float:
    if not math.isfinite(value) or not MIN_LORA_SCALE <= value <= MAX_LORA_SCALE:
        raise ValueError(f"scale must be a finite number between {MIN_LORA_SCALE} and {MAX_LORA_SCALE}")
    return value


class RegisteredLora(BaseModel):
    """One entry of `DREAMOMNI2_LORAS`: where its weights are, its default scale, the tasks it is for."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    path: str = Field(
        min_length=1,
        description="A local `.safetensors` file, a folder holding one (or `weight_name`), or a Hugging "
        "Face Hub id resolved once at worker start, like the other weights.",
    )
    weight_name: str | None = Field(
        default=None, description="The file inside a folder or Hub repository holding several."
    )
    scale: Annotated[float, AfterValidator(_finite_scale)] = Field(
        default=1.0, description="The scale of a request that names the LoRA without one."
    )
    tasks: list[Task] = Field(
        default=list(DEFAULT_LORA_TASKS),
        min_length=1,
        description="The tasks it may run with: `edit`, `generate`, `feature_mixing`.",
    )

    @field_validator("tasks")
    @classmethod
    def _image_tasks_only(cls, tasks: list[Task]) -> list[Task]:
        # The text tasks (judge, mixing_prompts) run the VLM, which no FLUX LoRA adapts.
        text = [t.value for t in tasks if t not in LORA_TASKS]
        if text:
            raise ValueError(
                f"a LoRA adapts FLUX, so it serves edit, generate or feature_mixing, not {', '.join(text)}"
            )
        return tasks


def _decode_registry(value: object) -> object:
    """`DREAMOMNI2_LORAS` as JSON text (an empty value: no LoRAs); objects from code pass through."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return {}
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(
            'must be a JSON object like {"name": {"path": "/models/loras/name.safetensors", "scale": 1.0, '
            f'"tasks": ["edit"]}}: {exc}'
        ) from None


def _check_names(registry: dict[str, RegisteredLora]) -> dict[str, RegisteredLora]:
    for name in registry:
        if not LORA_NAME.match(name):
            raise ValueError(
                f"the LoRA name {name!r} must be 1-64 letters, digits, `_`, `-` or `.`, starting with a "
                "letter or a digit"
            )
    return registry


#: The registry's type in a settings class: JSON text in the environment, names checked.
LoraRegistry = Annotated[
    dict[str, RegisteredLora], NoDecode, BeforeValidator(_decode_registry), AfterValidator(_check_names)
]


class LoraChoice(BaseModel):
    """A LoRA a request asks for: a registered name and, optionally, a scale (default: the registry's)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(max_length=64, description="A name `GET /v1/service` lists under `loras`.")
    scale: float | None = Field(
        default=None,
        description=f"{MIN_LORA_SCALE}..{MAX_LORA_SCALE}; 0 is the same as leaving the LoRA out. "
        "Left out: the LoRA's default scale.",
    )


def _decode_choices(value: object) -> object:
    # Multipart form fields are text: `loras` comes as the same JSON array a JSON body carries.
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError('must be a JSON array like [{"name": "my-style", "scale": 0.8}]') from None
    return value


#: A request's `loras` field: a list of choices, or its JSON text (multipart).
LoraChoices = Annotated[list[LoraChoice] | None, BeforeValidator(_decode_choices)]


class AppliedLora(BaseModel):
    """A LoRA a job runs with, resolved: its registered name and the scale it runs at."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    scale: float


class LoraInfo(BaseModel):
    """A registered LoRA as `GET /v1/service` lists it (its file stays the operator's business)."""

    name: str
    scale: float = Field(description="Its default scale.")
    tasks: list[Task] = Field(description="The tasks it may run with.")


def lora_catalogue(registry: dict[str, RegisteredLora]) -> list[LoraInfo]:
    """The registry as clients see it, by name."""
    return [
        LoraInfo(name=name, scale=entry.scale, tasks=entry.tasks) for name, entry in sorted(registry.items())
    ]


def resolve_loras(
    requested: list[LoraChoice] | None, task: Task, registry: dict[str, RegisteredLora], max_per_job: int
) -> list[AppliedLora]:
    """Check a request's `loras` against the registry; raises `InvalidInput` naming the problem.

    The LoRAs run in the order given, stacked on the adapter the method's rule picks.
    """
    requested = requested or []
    if len(requested) > max_per_job:
        raise InvalidInput(
            f"{len(requested)} LoRAs were asked for; at most {max_per_job} may run in one job here.",
            code=ErrorCode.TOO_MANY_LORAS,
            details={"field": "loras", "loras": len(requested), "max": max_per_job},
        )
    applied: list[AppliedLora] = []
    for choice in requested:
        entry = registry.get(choice.name)
        if entry is None:
            available = ", ".join(sorted(registry)) or "none are registered"
            raise InvalidInput(
                f"No LoRA named {choice.name!r} is registered on this deployment (available: {available}); "
                "GET /v1/service lists them.",
                code=ErrorCode.UNKNOWN_LORA,
                details={"field": "loras", "name": choice.name, "available": sorted(registry)},
            )
        if any(a.name == choice.name for a in applied):
            raise InvalidInput(
                f"The LoRA {choice.name!r} is named twice; name each LoRA once, with the scale you want.",
                code=ErrorCode.DUPLICATE_LORA,
                details={"field": "loras", "name": choice.name},
            )
        if task not in entry.tasks:
            raise InvalidInput(
                f"The LoRA {choice.name!r} is registered for {', '.join(t.value for t in entry.tasks)}, "
                f"not for task={task.value}; leave it out or choose another.",
                code=ErrorCode.LORA_NOT_FOR_TASK,
                details={"field": "loras", "name": choice.name, "task": task.value, "tasks": entry.tasks},
            )
        scale = entry.scale if choice.scale is None else choice.scale
        if not math.isfinite(scale) or not MIN_LORA_SCALE <= scale <= MAX_LORA_SCALE:
            raise InvalidInput(
                f"The scale of LoRA {choice.name!r} must be between {MIN_LORA_SCALE} and {MAX_LORA_SCALE}; "
                f"got {scale}.",
                code=ErrorCode.INVALID_LORA_SCALE,
                details={"field": "loras", "name": choice.name, "value": str(scale), "min": MIN_LORA_SCALE,
                         "max": MAX_LORA_SCALE},
            )  # fmt: skip
        applied.append(AppliedLora(name=choice.name, scale=scale))
    return applied

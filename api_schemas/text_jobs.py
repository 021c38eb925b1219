"""What a text job (`judge`, `mixing_prompts`) asks for, checked against the limits.

Kept apart from `api_schemas.jobs`, whose `resolve_job` hands text tasks here: a text job takes only
the fields below, and every image-sampling field sent with one is refused by name rather than
silently ignored (a caller who sends `steps` with a judge has misunderstood what it does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from api_schemas.checks import check_instruction, check_range, visible
from api_schemas.common import AdapterChoice, StepCache, Task
from api_schemas.errors import ErrorCode, InvalidInput
from api_schemas.text_tasks import MAX_ATTRIBUTE_CHARS

if TYPE_CHECKING:
    from api_schemas.jobs import JobLimits, JobParameters

#: The fields each text task takes (`translate` is ignored: it has a default, so it is always "sent").
TEXT_TASK_FIELDS: dict[Task, frozenset[str]] = {
    Task.JUDGE: frozenset({"task", "instruction", "translate"}),
    Task.MIXING_PROMPTS: frozenset({"task", "attribute", "count", "translate"}),
}


def _sent(value: object) -> bool:
    return value is not None and value != [] and value != {}


def resolve_text_job(
    params: JobParameters, task: Task, image_count: int, limits: JobLimits
) -> dict[str, Any]:
    """The fields of the `ResolvedJob` of a `judge` or `mixing_prompts` request; raises `InvalidInput`.

    `judge`: the instruction, and the images: the case's inputs in order, then the output to judge
    last (at least the output; at most DREAMOMNI2_MAX_IMAGES inputs). `mixing_prompts`: the attribute
    keyword and `count` pairs (1..DREAMOMNI2_MAX_MIXING_PROMPTS, default 1), no images. No denoising
    runs: steps and guidance are 0 and the adapter is `base` (no image model is used).
    """
    extra = sorted(
        name
        for name in type(params).model_fields
        if name not in TEXT_TASK_FIELDS[task] and _sent(getattr(params, name))
    )
    if extra:
        raise InvalidInput(
            f"{', '.join(extra)} do not apply to task={task.value}, which writes text with the language "
            "model and samples no image; leave them out.",
            code=ErrorCode.FIELD_NOT_FOR_TASK,
            details={"fields": extra, "task": task.value},
        )
    fields: dict[str, Any] = {}
    if task is Task.JUDGE:
        fields["instruction"] = _judge_instruction(params, image_count, limits)
    else:
        fields.update(_mixing_prompts_request(params, image_count, limits))
    return {
        "task": task,
        "seed": None,
        "steps": 0,
        "guidance": 0.0,
        "width": None,
        "height": None,
        "translate": False,
        "step_cache": StepCache.NONE,
        "image_count": image_count,
        "adapter": AdapterChoice.BASE,
        "instruction": None,
        **fields,
    }


def refuse_text_fields(params: JobParameters, task: Task) -> None:
    """Refuse `count`, which only `mixing_prompts` takes, on a job of another task."""
    if params.count is not None:
        raise InvalidInput(
            f"count applies to task=mixing_prompts only; this job is task={task.value}.",
            code=ErrorCode.FIELD_NOT_FOR_TASK,
            details={"fields": ["count"], "task": task.value},
        )


def _judge_instruction(params: JobParameters, image_count: int, limits: JobLimits) -> str:
    if image_count == 0:
        raise InvalidInput(
            "task=judge needs images: the case's input images in order, then the output image to judge "
            "last (an instruction with no input image: the output alone).",
            code=ErrorCode.JUDGE_NEEDS_OUTPUT,
        )
    return check_instruction(
        params.instruction or "",
        limits.max_instruction_chars,
        "task=judge needs the instruction the output was made from.",
    )


def _mixing_prompts_request(params: JobParameters, image_count: int, limits: JobLimits) -> dict[str, Any]:
    if image_count:
        raise InvalidInput(
            f"task=mixing_prompts writes prompts from the attribute alone and takes no images; "
            f"{image_count} were sent.",
            code=ErrorCode.FIELD_NOT_FOR_TASK,
            details={"fields": ["images"], "task": Task.MIXING_PROMPTS.value},
        )
    attribute = (params.attribute or "").strip()
    if not visible(attribute):
        raise InvalidInput(
            'task=mixing_prompts needs an attribute: a keyword such as "rattan weave", "crossed arms" or '
            '"bob haircut".',
            code=ErrorCode.EMPTY_ATTRIBUTE,
        )
    if len(attribute) > MAX_ATTRIBUTE_CHARS:
        raise InvalidInput(
            f"attribute has {len(attribute)} characters; the limit is {MAX_ATTRIBUTE_CHARS} (a keyword).",
            code=ErrorCode.PROMPT_TOO_LONG,
            details={"field": "attribute", "length": len(attribute), "max": MAX_ATTRIBUTE_CHARS},
        )
    count = params.count if params.count is not None else 1
    check_range("count", count, 1, limits.max_mixing_prompts)
    return {"attribute": attribute, "count": count}

"""What a job asks for, the limits it is checked against, and the rule that picks its adapter."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from api_schemas.checks import check_instruction
from api_schemas.checks import check_range as _check_range
from api_schemas.checks import visible as _visible
from api_schemas.common import MAX_SEED, AdapterChoice, MixBlocks, StepCache, Task
from api_schemas.errors import ErrorCode, InvalidInput
from api_schemas.images import ImageLimits
from api_schemas.loras import AppliedLora, LoraChoices, LoraRegistry, resolve_loras
from api_schemas.metadata import JobMetadata as JobMetadata  # what a job did: its own module, re-exported
from api_schemas.text_jobs import TEXT_TASK_FIELDS, refuse_text_fields, resolve_text_job

#: The most result images a job may have (`?index=` 0..15): a Feature Mixing pair's two, or up to
#: `DREAMOMNI2_MAX_NUM_IMAGES` (which may not exceed it).
MAX_RESULTS = 16


class JobParameters(BaseModel):
    """The user's request, less the images. Unset numbers take the deployment's defaults."""

    # Non-finite numbers are refused here: they cannot be compared with a limit or rendered as JSON.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    instruction: str | None = Field(
        default=None,
        description="What to do, in plain words; images are referred to as image 1, 2, ... "
        "Required for `edit`, `generate` and `judge` (the instruction the judged output was made from); "
        "not used by `feature_mixing` and `mixing_prompts`.",
    )
    task: Task | None = Field(
        default=None,
        description="`edit`, `generate`, `feature_mixing`, `judge` or `mixing_prompts`; left out: `edit` "
        "with at least one image, else `generate` (or `feature_mixing` when source_prompt and "
        "target_prompt are sent). `judge` and `mixing_prompts` write JSON (the job's `output`), no image.",
    )
    seed: int | None = Field(
        default=None,
        description="Random seed, 0..2^53-1 (exact in JavaScript); left out: a random one, reported back.",
    )
    steps: int | None = Field(default=None, description="Denoising steps.")
    num_images: int | None = Field(
        default=None,
        description="How many images to sample, 1..DREAMOMNI2_MAX_NUM_IMAGES (default 1); image i uses "
        "seed + i, sampled together with the others as one batch where the worker's memory allows "
        "(then close to the image a one-image job with that seed gives; one after another: that image, "
        "bit for bit). Results: `?index=0..n-1`. Not with `feature_mixing` (a pair is one job's two images).",
    )
    guidance: float | None = Field(default=None, description="Distilled guidance scale.")
    width: int | None = Field(
        default=None,
        description="Generation only: output width; sets the aspect ratio, the area stays ~1 MP.",
    )
    height: int | None = Field(default=None, description="Generation only: output height (see width).")
    translate: bool = Field(
        default=True, description="Rewrite the instruction with the VLM translator first."
    )
    step_cache: StepCache | None = Field(
        default=None,
        description="Step caching: `none`, or a policy the deployment allows (`first_block`, "
        "`taylorseer`); faster at some quality cost. Left out: the deployment's default.",
    )
    source_prompt: str | None = Field(
        default=None,
        description="Feature Mixing: the source image's prompt (the image that has the attribute).",
    )
    target_prompt: str | None = Field(
        default=None,
        description="Feature Mixing: the target image's prompt; the target takes the shared attribute "
        "from the source.",
    )
    attribute: str | None = Field(
        default=None,
        description="Feature Mixing: the attribute or object the pair shares (a label kept with the job, "
        "e.g. `material`).",
    )
    mix_blocks: MixBlocks | None = Field(
        default=None,
        description="Feature Mixing: which transformer blocks mix (`all`, `double`, `single`, `none`); "
        "default `all`.",
    )
    mix_steps: float | None = Field(
        default=None,
        description="Feature Mixing: the fraction of denoising steps that mix, from the first; 0..1, "
        "default 1.",
    )
    mix_strength: float | None = Field(
        default=None,
        description="Feature Mixing: how much attention the target may give the source's image tokens, "
        "0..1 (1: the method's plain softmax over both, 0: none); default 1.",
    )
    loras: LoraChoices = Field(
        default=None,
        description="Operator-registered LoRAs to stack on the adapter the method picks, in order: "
        '`[{"name": "my-style", "scale": 0.8}]` (multipart: the same JSON as text). Names and default '
        "scales: `GET /v1/service`; scale -4..4, 0 = left out; at most DREAMOMNI2_MAX_LORAS_PER_JOB.",
    )
    count: int | None = Field(
        default=None,
        description="`mixing_prompts` only: how many (source, target) prompt pairs to write for the "
        "`attribute` keyword, 1..DREAMOMNI2_MAX_MIXING_PROMPTS; default 1.",
    )


def _comma_separated(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class JobLimits(BaseSettings):
    """Deployment limits and defaults (`DREAMOMNI2_MAX_IMAGES`, ...), read from the environment.

    The gateway and the engine check every request against the same ones.
    """

    model_config = SettingsConfigDict(env_prefix="DREAMOMNI2_", extra="ignore")

    max_images: int = 5
    #: The most images one job may sample (`num_images`).
    max_num_images: int = 4
    max_instruction_chars: int = 2000
    min_steps: int = 1
    max_steps: int = 100
    default_steps: int = 30
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    default_guidance: float = 3.5
    min_size: int = 64
    max_size: int = 4096
    max_aspect_ratio: float = 4.0
    default_size: int = 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    #: The step caches a request may ask for (`none` always may).
    step_caches: Annotated[list[StepCache], NoDecode, BeforeValidator(_comma_separated)] = [
        StepCache.FIRST_BLOCK,
        StepCache.TAYLORSEER,
    ]
    #: The step cache of a request that names none.
    step_cache: StepCache = StepCache.NONE
    min_image_side: int = 16
    max_image_aspect_ratio: float = 4.0
    #: The LoRAs a request may name (`api_schemas.loras`): JSON, name -> {path, scale, tasks}.
    loras: LoraRegistry = {}
    #: The highest rank a registered LoRA may have (a worker refuses to start on a higher one).
    max_lora_rank: int = Field(default=128, ge=1)
    #: The most LoRAs one job may stack (`loras`).
    max_loras_per_job: int = Field(default=3, ge=0)
    #: The most prompt pairs one `mixing_prompts` job may ask for (`count`).
    max_mixing_prompts: int = Field(default=8, ge=1, le=64)
    #: The longest prompt a `mixing_prompts` job may write (characters); with `max_mixing_prompts` it
    #: bounds the answer, so the longest decoding (and its KV cache) is known before it starts.
    mixing_prompt_max_chars: int = Field(default=200, ge=8)

    @model_validator(mode="after")
    def _num_images_fit_the_results(self) -> JobLimits:
        if not 1 <= self.max_num_images <= MAX_RESULTS:
            raise ValueError(f"DREAMOMNI2_MAX_NUM_IMAGES must be 1..{MAX_RESULTS}; got {self.max_num_images}")
        return self

    @model_validator(mode="after")
    def _default_cache_is_allowed(self) -> JobLimits:
        if self.step_cache is not StepCache.NONE and self.step_cache not in self.step_caches:
            raise ValueError(
                f"DREAMOMNI2_STEP_CACHE={self.step_cache.value} is not in DREAMOMNI2_STEP_CACHES "
                f"({', '.join(c.value for c in self.step_caches) or 'empty'})"
            )
        return self

    @model_validator(mode="after")
    def _written_prompts_are_accepted(self) -> JobLimits:
        if self.mixing_prompt_max_chars > self.max_instruction_chars:
            raise ValueError(
                f"DREAMOMNI2_MIXING_PROMPT_MAX_CHARS={self.mixing_prompt_max_chars} is over "
                f"DREAMOMNI2_MAX_INSTRUCTION_CHARS={self.max_instruction_chars}: the prompts written "
                "would be refused as Feature Mixing prompts"
            )
        return self

    def max_images_for(self, task: Task) -> int:
        """The most images a job of `task` may send: DREAMOMNI2_MAX_IMAGES, and one more for a judge
        (the case's inputs, then the output to judge)."""
        return self.max_images + 1 if task is Task.JUDGE else self.max_images

    def image_limits(self) -> ImageLimits:
        """The per-image limits uploads are decoded under."""
        return ImageLimits(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            min_side=self.min_image_side,
            max_aspect_ratio=self.max_image_aspect_ratio,
        )


#: The fields only Feature Mixing takes.
MIXING_FIELDS = ("source_prompt", "target_prompt", "attribute", "mix_blocks", "mix_steps", "mix_strength")


class ResolvedJob(BaseModel):
    """A checked job with every default filled in (seed excepted: the engine draws one)."""

    instruction: str | None
    task: Task
    seed: int | None
    steps: int
    guidance: float
    width: int | None
    height: int | None
    translate: bool
    step_cache: StepCache
    image_count: int
    adapter: AdapterChoice
    num_images: int = 1
    source_prompt: str | None = None
    target_prompt: str | None = None
    attribute: str | None = None
    mix_blocks: MixBlocks | None = None
    mix_steps: float | None = None
    mix_strength: float | None = None
    loras: list[AppliedLora] = []
    #: `mixing_prompts`: how many pairs to write.
    count: int | None = None

    def parameters(self) -> JobParameters:
        """The request with every default filled in, as the worker runs it."""
        names = set(JobParameters.model_fields)
        if self.task.writes_text:  # its image fields hold fill-ins (steps 0), not values to check
            names &= TEXT_TASK_FIELDS[self.task]
        return JobParameters.model_validate(self.model_dump(include=names))


def choose_adapter(task: Task, image_count: int) -> AdapterChoice:
    """The method's rule: a LoRA runs only when reference images are present.

    For editing, image 1 is the image to edit and references are images 2..n; for generation every
    input image is a reference.
    """
    if task is Task.FEATURE_MIXING or task.writes_text:
        return AdapterChoice.BASE
    references = image_count - 1 if task is Task.EDIT else image_count
    if references <= 0:
        return AdapterChoice.BASE
    return AdapterChoice.EDIT if task is Task.EDIT else AdapterChoice.GENERATION


def resolve_job(params: JobParameters, image_count: int, limits: JobLimits) -> ResolvedJob:
    """Check a request against the limits and fill in defaults; raises `InvalidInput` naming the limit."""
    task = params.task or _default_task(params, image_count)
    if image_count > limits.max_images_for(task):
        what = "the inputs, then the output to judge" if task is Task.JUDGE else "image 1 plus references"
        raise InvalidInput(
            f"{image_count} images were sent; at most {limits.max_images_for(task)} are allowed ({what}).",
            code=ErrorCode.TOO_MANY_IMAGES,
            details={"images": image_count, "max": limits.max_images_for(task)},
        )
    if task.writes_text:
        return ResolvedJob(**resolve_text_job(params, task, image_count, limits))
    refuse_text_fields(params, task)
    if task is Task.EDIT and image_count == 0:
        raise InvalidInput(
            "An edit needs the image to edit as image 1; send at least one image, or use task=generate.",
            code=ErrorCode.EDIT_NEEDS_IMAGE,
        )
    mixing: dict = {}
    if task is Task.FEATURE_MIXING:
        instruction = None
        mixing = _resolve_mixing(params, image_count, limits)
    else:
        instruction = _resolve_instruction(params, task, limits)
    steps = params.steps if params.steps is not None else limits.default_steps
    _check_range("steps", steps, limits.min_steps, limits.max_steps)
    guidance = params.guidance if params.guidance is not None else limits.default_guidance
    _check_range("guidance", guidance, limits.min_guidance, limits.max_guidance)
    num_images = _resolve_num_images(params, task, limits)
    if params.seed is not None:
        # Image i uses seed + i: the last one must be a seed too.
        _check_range("seed", params.seed, 0, MAX_SEED - (num_images - 1))
    step_cache = _resolve_step_cache(params, task, limits)
    loras = resolve_loras(params.loras, task, limits.loras, limits.max_loras_per_job)

    width, height = params.width, params.height
    if task is Task.EDIT and (width is not None or height is not None):
        raise InvalidInput(
            "width and height apply to generation only; an edit keeps the aspect ratio of image 1.",
            code=ErrorCode.SIZE_WITH_EDIT,
        )
    if task is not Task.EDIT:
        # Check the sides as sent first: a side left out copies the other, and the error must name
        # the one the caller actually sent.
        for name, value in (("width", width), ("height", height)):
            if value is not None:
                _check_range(name, value, limits.min_size, limits.max_size)
        width = width if width is not None else (height if height is not None else limits.default_size)
        height = height if height is not None else width
        _check_range("width", width, limits.min_size, limits.max_size)
        _check_range("height", height, limits.min_size, limits.max_size)
        ratio = max(width, height) / min(width, height)
        if ratio > limits.max_aspect_ratio:
            raise InvalidInput(
                f"A {width}x{height} output has an aspect ratio of {ratio:.2f}:1; "
                f"the limit is {limits.max_aspect_ratio}:1.",
                code=ErrorCode.INVALID_SIZE,
                details={"width": width, "height": height, "max_aspect_ratio": limits.max_aspect_ratio},
            )
    return ResolvedJob(
        instruction=instruction,
        task=task,
        seed=params.seed,
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        # Feature Mixing's prompts go to the text encoders as they are.
        translate=params.translate and task is not Task.FEATURE_MIXING,
        step_cache=step_cache,
        image_count=image_count,
        adapter=choose_adapter(task, image_count),
        num_images=num_images,
        loras=loras,
        **mixing,
    )


def _resolve_num_images(params: JobParameters, task: Task, limits: JobLimits) -> int:
    num_images = params.num_images if params.num_images is not None else 1
    _check_range("num_images", num_images, 1, limits.max_num_images)
    if task is Task.FEATURE_MIXING and num_images != 1:
        raise InvalidInput(
            f"task=feature_mixing samples one pair per job; num_images={num_images} does not apply "
            "(send one job per pair, with its own seed).",
            code=ErrorCode.INVALID_NUM_IMAGES,
            details={"field": "num_images", "value": num_images, "task": task.value},
        )
    return num_images


def _resolve_step_cache(params: JobParameters, task: Task, limits: JobLimits) -> StepCache:
    step_cache = params.step_cache or limits.step_cache
    if task is Task.FEATURE_MIXING:
        # The two branches share every attention layer; a step cache would skip them apart.
        if params.step_cache not in (None, StepCache.NONE):
            raise InvalidInput(
                f"step_cache={params.step_cache.value} does not apply to task=feature_mixing; leave it out.",
                code=ErrorCode.STEP_CACHE_NOT_ALLOWED,
                details={"step_cache": params.step_cache.value, "allowed": ["none"]},
            )
        step_cache = StepCache.NONE
    if step_cache is not StepCache.NONE and step_cache not in limits.step_caches:
        allowed = ", ".join(["none", *(c.value for c in limits.step_caches)])
        raise InvalidInput(
            f"step_cache={step_cache.value} is not allowed on this deployment; use one of {allowed}.",
            code=ErrorCode.STEP_CACHE_NOT_ALLOWED,
            details={"step_cache": step_cache.value, "allowed": allowed.split(", ")},
        )
    return step_cache


def _resolve_instruction(params: JobParameters, task: Task, limits: JobLimits) -> str:
    sent = [name for name in MIXING_FIELDS if getattr(params, name) is not None]
    if sent:
        raise InvalidInput(
            f"{', '.join(sent)} apply to task=feature_mixing only; this job is task={task.value}.",
            code=ErrorCode.MIXING_FIELD_WITHOUT_MIXING,
            details={"fields": sent, "task": task.value},
        )
    if params.instruction is None:
        raise InvalidInput(
            f"task={task.value} needs an instruction: say what to do, in plain words (for a Feature "
            "Mixing pair, send task=feature_mixing with source_prompt and target_prompt instead).",
            code=ErrorCode.EMPTY_INSTRUCTION,
        )
    return check_instruction(
        params.instruction,
        limits.max_instruction_chars,
        "The instruction is empty (or only invisible characters); say what to do with the images.",
    )


def _default_task(params: JobParameters, image_count: int) -> Task:
    if image_count:
        return Task.EDIT
    if params.source_prompt is not None and params.target_prompt is not None and params.instruction is None:
        return Task.FEATURE_MIXING
    return Task.GENERATE


def _resolve_mixing(params: JobParameters, image_count: int, limits: JobLimits) -> dict:
    """Feature Mixing's own fields, checked, defaults filled in (the method as described: every block,
    every step, full strength)."""
    if image_count:
        raise InvalidInput(
            f"task=feature_mixing generates both images of a pair from text and takes no images; "
            f"{image_count} were sent.",
            code=ErrorCode.MIXING_TAKES_NO_IMAGES,
            details={"images": image_count},
        )
    if params.instruction is not None:
        raise InvalidInput(
            "task=feature_mixing takes source_prompt and target_prompt, not an instruction.",
            code=ErrorCode.MIXING_FIELD_WITHOUT_MIXING,
            details={"fields": ["instruction"], "task": Task.FEATURE_MIXING.value},
        )
    prompts = {}
    for name in ("source_prompt", "target_prompt", "attribute"):
        value = getattr(params, name)
        value = value.strip() if value is not None else None
        if name != "attribute" and (value is None or not _visible(value)):
            raise InvalidInput(
                f"task=feature_mixing needs a non-empty {name}: the source_prompt describes the image "
                "that has the attribute, the target_prompt the image that takes it.",
                code=ErrorCode.MIXING_NEEDS_PROMPTS,
                details={"field": name},
            )
        if value is not None and len(value) > limits.max_instruction_chars:
            raise InvalidInput(
                f"{name} has {len(value)} characters; the limit is {limits.max_instruction_chars}.",
                code=ErrorCode.PROMPT_TOO_LONG,
                details={"field": name, "length": len(value), "max": limits.max_instruction_chars},
            )
        prompts[name] = value or None
    mix_steps = params.mix_steps if params.mix_steps is not None else 1.0
    _check_range("mix_steps", mix_steps, 0.0, 1.0)
    mix_strength = params.mix_strength if params.mix_strength is not None else 1.0
    _check_range("mix_strength", mix_strength, 0.0, 1.0)
    return {
        **prompts,
        "mix_blocks": params.mix_blocks or MixBlocks.ALL,
        "mix_steps": mix_steps,
        "mix_strength": mix_strength,
    }

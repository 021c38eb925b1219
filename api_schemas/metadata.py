"""What the engine did for a job (`JobMetadata`): the worker stores it, the job object shows it."""

from __future__ import annotations

from pydantic import BaseModel, Field

from api_schemas.common import AdapterChoice, StepCache, Task
from api_schemas.loras import AppliedLora
from api_schemas.text_tasks import TextOutput


class JobMetadata(BaseModel):
    """What the engine did for a job: the prompt it sampled with, the adapter, the seed, timings."""

    prompt: str = Field(
        description="The prompt the image was sampled with (translated, or the instruction); a text job: "
        "the text its language model was asked."
    )
    translated: bool = Field(
        description="True: the translator's answer was used; false: the instruction itself."
    )
    translation_raw: str | None = Field(default=None, description="The translator's raw answer, when it ran.")
    translation_tokens: int | None = Field(
        default=None, description="Tokens the translator generated, when it ran (its budget is the cap)."
    )
    fallback_reason: str | None = Field(
        default=None,
        description="Why the instruction was used as is: disabled_by_request, disabled_by_deployment, "
        "unparseable, empty, or truncated (the answer hit the translator's token budget).",
    )
    adapter: AdapterChoice
    task: Task
    seed: int | None = Field(
        default=None, description="The seed of the first image (image i used seed + i); none for a text job."
    )
    seeds: list[int] | None = Field(
        default=None, description="Each image's seed, in result order (several images: seed, seed+1, ...)."
    )
    batch_size: int = Field(
        default=1,
        description="The most images sampled together as one batch (1: one after another, each bit for bit "
        "the one-image job with its seed; more: close to it, not bit-identical).",
    )
    source_prompt: str | None = Field(default=None, description="Feature Mixing: the source image's prompt.")
    target_prompt: str | None = Field(default=None, description="Feature Mixing: the target image's prompt.")
    attribute: str | None = Field(default=None, description="Feature Mixing: the shared attribute's label.")
    mixing: dict[str, str | float | int] | None = Field(
        default=None,
        description="Feature Mixing: blocks, step_fraction, strength, and the mixed_steps and "
        "mixed_layers that ran.",
    )
    steps: int
    guidance: float
    width: int | None = Field(default=None, description="The output's width; none for a text job.")
    height: int | None = Field(default=None, description="The output's height; none for a text job.")
    image_count: int
    output: TextOutput | None = Field(
        default=None, description="A text job (judge, mixing_prompts): its result, parsed from `output_raw`."
    )
    output_raw: str | None = Field(
        default=None, description="A text job: the language model's answer exactly as it was decoded."
    )
    output_tokens: int | None = Field(
        default=None,
        description="A text job: tokens the model generated (its budget is the longest answer the JSON "
        "schema allows).",
    )
    speed_profile: str = Field(
        default="reference",
        description="The speed profile the job ran with: the deployment's, `reference` where the worker "
        "could not compile, `<profile>-eager` where its compiled blocks run uncompiled.",
    )
    step_cache: StepCache = Field(default=StepCache.NONE, description="The step cache the job ran with.")
    loras: list[AppliedLora] = Field(default=[], description="The registered LoRAs it ran with, and scales.")
    transformer_evaluations: int | None = Field(
        default=None, description="Full transformer passes that ran (steps minus those a step cache skipped)."
    )
    timings: dict[str, float] = Field(
        description="Seconds per stage: translate, encode, denoise, decode, and total."
    )

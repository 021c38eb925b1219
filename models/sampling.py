"""The kinds of job the engine runs, each as what sets it apart from the others (`Sampling`): an edit or
a generation (the instruction translated, one prompt, one image), or a Feature Mixing pair (two
prompts as they are, both branches sampled from one seed). The engine's one job body runs either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import PIL.Image
import torch

from api_schemas.common import Task
from api_schemas.jobs import ResolvedJob
from models.mixing import MixingConfig
from models.modes import Group, Stage
from models.pipeline import DreamOmni2Pipeline
from models.stages import stage

if TYPE_CHECKING:
    from models.engine import Engine


class ProgressCallback(Protocol):
    """Called as ``on_progress(stage, step, total)``; stages: translate, encode, denoise, decode.

    A run asked for previews (`Engine.run`'s ``preview_every``) also passes ``preview=`` (a data URI,
    `models.preview`) on the denoising steps that carry one, and only there.
    """

    def __call__(self, stage: str, step: int, total: int, *, preview: str | None = None) -> None: ...


#: A pipeline's ``callback_on_step_end``.
StepCallback = Callable[[DreamOmni2Pipeline, int, torch.Tensor, dict], dict]
#: What an ordinary job's step callback gets (a pair's gets the same): the step's result and velocity.
STEP_TENSORS = ["latents", "noise_pred"]
#: One prompt's (embeddings, pooled embeddings).
Embeddings = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Sampling:
    """What sets one kind of job apart (an ordinary edit or generation, a Feature Mixing pair): the
    prompts to encode, how the transformer samples them, and the metadata only that kind reports.

    ``sample(embeddings, generator, on_step_end)`` returns the images, the pipeline's stage timings
    and the kind's own metadata fields.
    """

    prompts: list[str]
    sample: Callable[
        [list[Embeddings], torch.Generator, StepCallback],
        tuple[list[PIL.Image.Image], dict[str, float], dict[str, object]],
    ]
    fields: dict[str, object]


def ordinary(
    engine: Engine, job: ResolvedJob, images: list[PIL.Image.Image], progress: ProgressCallback
) -> Sampling:
    """An edit or a generation: the instruction translated (or not), one prompt, one image."""
    progress("translate", 0, 1)
    prompt, fields = job.instruction, {"translated": False, "fallback_reason": None}
    if not job.translate:
        fields["fallback_reason"] = "disabled_by_request"
    elif engine.translator is None:
        fields["fallback_reason"] = "disabled_by_deployment"
    else:
        with engine.placement.running(Group.TRANSLATOR), stage(Stage.TRANSLATE):
            translation = engine.translator.translate(images, job.instruction, job.task)
        prompt = translation.prompt
        fields = {
            "translated": translation.translated,
            "translation_raw": translation.raw,
            "fallback_reason": translation.fallback_reason,
            "translation_tokens": translation.generated_tokens,
        }
    progress("translate", 1, 1)
    # The edit output takes image 1's bucketed size; a generation takes the requested one.
    height, width = job.height, job.width
    if job.task is Task.EDIT and images:
        width, height = images[0].size

    def sample(
        embeddings: list[Embeddings], generator: torch.Generator, on_step_end: StepCallback
    ) -> tuple[list[PIL.Image.Image], dict[str, float], dict[str, object]]:
        ((prompt_embeds, pooled_prompt_embeds),) = embeddings
        output = engine.pipeline(
            images=images,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            height=height,
            width=width,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            generator=generator,
            max_area=engine.max_area,
            # The images are on their buckets already; the pipeline keeps their size.
            resolution_buckets=None,
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=STEP_TENSORS,
        )
        return [output.images[0]], output.timings, {}

    return Sampling(prompts=[prompt], sample=sample, fields={"prompt": prompt, **fields})


def pair(engine: Engine, job: ResolvedJob) -> Sampling:
    """A Feature Mixing pair: both prompts as they are (no translation), both branches sampled from
    one seed with base Kontext (the job's adapter; the rule gives `base`), both decoded."""
    config = MixingConfig.from_job(job)
    if engine.mixing_batched:
        config = dataclasses.replace(config, batched=True)

    def sample(
        embeddings: list[Embeddings], generator: torch.Generator, on_step_end: StepCallback
    ) -> tuple[list[PIL.Image.Image], dict[str, float], dict[str, object]]:
        (source_embeds, source_pooled), (target_embeds, target_pooled) = embeddings
        output = engine.pipeline.generate_pair(
            source_prompt_embeds=source_embeds,
            source_pooled_prompt_embeds=source_pooled,
            target_prompt_embeds=target_embeds,
            target_pooled_prompt_embeds=target_pooled,
            config=config,
            height=job.height,
            width=job.width,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            generator=generator,
            max_area=engine.max_area,
            callback_on_step_end=on_step_end,
        )
        mixing = config.describe(output.mixed_steps, output.mixed_layers)
        return list(output.images), output.timings, {"mixing": mixing}

    return Sampling(
        prompts=[job.source_prompt, job.target_prompt],
        sample=sample,
        fields={
            "prompt": job.source_prompt,
            "translated": False,
            "fallback_reason": None,
            "source_prompt": job.source_prompt,
            "target_prompt": job.target_prompt,
            "attribute": job.attribute,
        },
    )

"""The kinds of job the engine runs, each as what sets it apart from the others (`Sampling`): an edit or
a generation (the instruction translated, one prompt, its images), or a Feature Mixing pair (two
prompts as they are, both branches sampled from one seed); and the one job body (`run_job`) that
runs either: prompts, seeds, encoding, sampling in rounds, timings and metadata.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import PIL.Image
import torch

from api_schemas.common import MAX_SEED, Task
from api_schemas.errors import JobCanceled
from api_schemas.jobs import JobMetadata, ResolvedJob
from models.fp8 import compute_dtype_of
from models.mixing import MixingConfig
from models.modes import Group, Stage
from models.pipeline import DreamOmni2Pipeline
from models.preview import preview_due, render_preview
from models.speed import step_cache, step_cache_config
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
class JobOutput:
    """A job's images (one per `num_images`; a Feature Mixing pair: the source, then the target) and its
    metadata."""

    images: list[PIL.Image.Image]
    metadata: JobMetadata

    @property
    def image(self) -> PIL.Image.Image:
        """The first image: the job's result, or the source of a Feature Mixing pair."""
        return self.images[0]


@dataclass
class Sampling:
    """What sets one kind of job apart (an ordinary edit or generation, a Feature Mixing pair): the
    prompts to encode, how the transformer samples them, and the metadata only that kind reports.

    ``sample(embeddings, generators, on_step_end)`` samples one round: one output per generator (each
    seeded with its image's seed) as one batch, and returns the images, the pipeline's stage timings
    and the kind's own metadata fields. ``batchable``: whether a round may hold more than one.
    """

    prompts: list[str]
    sample: Callable[
        [list[Embeddings], list[torch.Generator], StepCallback],
        tuple[list[PIL.Image.Image], dict[str, float], dict[str, object]],
    ]
    fields: dict[str, object]
    batchable: bool = False


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
        embeddings: list[Embeddings], generators: list[torch.Generator], on_step_end: StepCallback
    ) -> tuple[list[PIL.Image.Image], dict[str, float], dict[str, object]]:
        ((prompt_embeds, pooled_prompt_embeds),) = embeddings
        batch = len(generators)
        # One generator as such: a round of one draws exactly the noise of a one-image job.
        generator: torch.Generator | list[torch.Generator] = generators[0] if batch == 1 else generators
        if batch > 1:
            prompt_embeds = prompt_embeds.repeat(batch, 1, 1)
            pooled_prompt_embeds = pooled_prompt_embeds.repeat(batch, 1)
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
        return list(output.images), output.timings, {}

    return Sampling(prompts=[prompt], sample=sample, fields={"prompt": prompt, **fields}, batchable=True)


def pair(engine: Engine, job: ResolvedJob) -> Sampling:
    """A Feature Mixing pair: both prompts as they are (no translation), both branches sampled from
    one seed with base Kontext (the job's adapter; the rule gives `base`), both decoded."""
    config = MixingConfig.from_job(job)
    if engine.mixing_batched:
        config = dataclasses.replace(config, batched=True)

    def sample(
        embeddings: list[Embeddings], generators: list[torch.Generator], on_step_end: StepCallback
    ) -> tuple[list[PIL.Image.Image], dict[str, float], dict[str, object]]:
        (source_embeds, source_pooled), (target_embeds, target_pooled) = embeddings
        (generator,) = generators
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


@torch.no_grad()
def run_job(
    engine: Engine,
    job: ResolvedJob,
    uploads: list[PIL.Image.Image],
    progress: ProgressCallback,
    cancel: Callable[[], bool],
    preview_every: int,
) -> JobOutput:
    """The one job body: prompts, seeds, encoding, sampling, timings and metadata, for every kind.

    A job's images are sampled in rounds of up to `Engine.batch_size` (a Feature Mixing pair: one
    pair per round), image n from the seed + n generator. A round of one is bit for bit the
    one-image job with that seed; in a larger round the transformer computes the images together,
    which changes the order of its sums (close, not bit-identical: `bench/batch_bench.py`).
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if job.task is Task.FEATURE_MIXING:
        sampling = pair(engine, job)
    else:
        sampling = ordinary(engine, job, engine.prepare_images(uploads), progress)
        timings["translate"] = time.perf_counter() - started
    if cancel():
        raise JobCanceled("The job was canceled before sampling started.")

    engine.adapters.activate(job.adapter, job.loras)
    # Image i uses seed + i: the last one must be a seed too.
    seed = job.seed if job.seed is not None else secrets.randbelow(MAX_SEED + 2 - job.num_images)
    seeds = [seed + n for n in range(job.num_images)]
    batch = engine.batch_size if sampling.batchable else 1
    rounds = [seeds[n : n + batch] for n in range(0, len(seeds), batch)]

    progress("encode", 0, 1)
    encode_started = time.perf_counter()
    # The prompts are encoded here rather than inside the pipeline call so that the text encoders
    # can leave the GPU before the transformer needs it; the pipeline takes the embeddings as is.
    device = engine.pipeline.compute_device or engine.pipeline.device
    with engine.placement.running(Group.TEXT_ENCODERS), stage(Stage.ENCODE_PROMPT):
        embeddings = [
            engine.pipeline.encode_prompt(prompt=prompt, prompt_2=None, device=device)[:2]
            for prompt in sampling.prompts
        ]
    encode_prompt_s = time.perf_counter() - encode_started
    if cancel():
        raise JobCanceled("The job was canceled before sampling started.")

    # The rounds report their steps as one run: round r's step s is r * steps + s of the total.
    total_steps = job.steps * len(rounds)
    steps_before = 0

    def on_step_end(pipe: DreamOmni2Pipeline, step: int, timestep: torch.Tensor, tensors: dict) -> dict:
        done = steps_before + step + 1
        if preview_due(done, preview_every):
            estimate = pipe.denoised_latents(tensors["latents"], tensors["noise_pred"])
            progress("denoise", done, total_steps, preview=render_preview(estimate))
        else:
            progress("denoise", done, total_steps)
        if cancel():
            raise JobCanceled(f"The job was canceled after denoising step {done} of {total_steps}.")
        return {}

    transformer = engine.pipeline.transformer
    cache = step_cache_config(
        job.step_cache,
        first_block_threshold=engine.settings.first_block_threshold,
        taylorseer_interval=engine.settings.taylorseer_interval,
        # fp8 storage makes the transformer report its codes' dtype; the cache keeps compute numbers.
        dtype=compute_dtype_of(transformer) or transformer.dtype,
    )
    engine.evaluations.count = 0
    images: list[PIL.Image.Image] = []
    image_seeds: list[int] = []
    with engine.placement.running(Group.TRANSFORMER):
        for round_seeds in rounds:
            # Each round from its own seeds' generators and a fresh step cache.
            generators = [torch.Generator("cpu").manual_seed(s) for s in round_seeds]
            with step_cache(transformer, cache):
                sampled, stage_timings, fields = sampling.sample(embeddings, generators, on_step_end)
            images.extend(sampled)
            per_seed = len(sampled) // len(round_seeds)  # a pair: two images from one seed
            image_seeds.extend(s for s in round_seeds for _ in range(per_seed))
            for name, seconds in stage_timings.items():
                timings[name] = timings.get(name, 0.0) + seconds
            steps_before += job.steps
    progress("decode", 1, 1)
    timings["encode"] += encode_prompt_s
    timings["total"] = time.perf_counter() - started
    metadata = JobMetadata(
        adapter=job.adapter,
        task=job.task,
        seed=seed,
        seeds=image_seeds,
        batch_size=len(rounds[0]),
        steps=job.steps,
        guidance=job.guidance,
        width=images[0].width,
        height=images[0].height,
        image_count=job.image_count,
        speed_profile=engine.profile.serving,
        step_cache=job.step_cache,
        loras=job.loras,
        transformer_evaluations=engine.evaluations.count,
        timings=timings,
        **sampling.fields,
        **fields,
    )
    return JobOutput(images=images, metadata=metadata)

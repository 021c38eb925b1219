"""The engine: pipeline, adapters and translator held once, one job at a time."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import PIL.Image
import torch

from api_schemas.common import MAX_SEED, Task
from api_schemas.errors import ErrorCode, InvalidInput, JobCanceled, ModelOutOfMemory
from api_schemas.images import load_image, normalize_image
from api_schemas.jobs import JobMetadata, JobParameters, ResolvedJob, resolve_job
from api_schemas.records import JobSpec
from models.adapters import AdapterSet
from models.mixing import MixingConfig, generate_pair
from models.modes import Group, Residency, is_cpu, same_device
from models.pipeline import (
    DEFAULT_MAX_AREA,
    KONTEXT_BUCKETS,
    DreamOmni2Pipeline,
    resize_to_bucket,
    scale_buckets,
)
from models.placement import Placement
from models.profiles import SpeedProfile
from models.settings import EngineSettings, Preset, resolve_device, resolve_dtype
from models.speed import (
    FusedAdapters,
    ProfileReport,
    apply_profile,
    install_counter,
    step_cache,
    step_cache_config,
)
from models.translator import InstructionTranslator

if TYPE_CHECKING:
    from models.memory import MemoryPlan

logger = logging.getLogger(__name__)

#: The tiny preset's smaller resolutions: 1/16 of the real buckets and a 64x64 output area.
TINY_BUCKET_SCALE = 1 / 16
TINY_MAX_AREA = 64 * 64

#: Called as ``on_progress(stage, step, total)``; stages: translate, encode, denoise, decode.
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ModelLayout:
    """Where each part's weights are: the published layout, from the Hub or local folders."""

    kontext: str
    edit_lora: Path
    gen_lora: Path
    vlm: Path


@dataclass
class JobOutput:
    """A job's images (one; a Feature Mixing pair: the source, then the target) and its metadata."""

    images: list[PIL.Image.Image]
    metadata: JobMetadata

    @property
    def image(self) -> PIL.Image.Image:
        """The first image: the job's result, or the source of a Feature Mixing pair."""
        return self.images[0]


def resolve_layout(settings: EngineSettings) -> ModelLayout:
    """Local folders for the configured preset; builds the tiny set once, or fetches the release."""
    if settings.preset is Preset.TINY:
        from models.tiny import ensure_tiny

        root = ensure_tiny(settings.cache_dir)
        return ModelLayout(str(root / "kontext"), root / "edit_lora", root / "gen_lora", root / "vlm-model")
    adapters = Path(settings.adapters)
    if not adapters.is_dir():
        from huggingface_hub import snapshot_download

        patterns = ["edit_lora/*", "gen_lora/*"] + (["vlm-model/*"] if settings.translator else [])
        adapters = Path(snapshot_download(settings.adapters, allow_patterns=patterns))
    return ModelLayout(
        settings.base_model, adapters / "edit_lora", adapters / "gen_lora", adapters / "vlm-model"
    )


class Engine:
    """Holds FLUX.1 Kontext, both DreamOmni2 LoRAs and the translator; runs one job at a time.

    Build it once per process (loading takes minutes with the real weights) and call `run` per job.
    """

    #: Feature Mixing pairs as one batch-2 transformer call per step instead of two exact batch-1
    #: passes (`models.mixing.MixingConfig.batched`); off: the source is bit-identical to an ordinary job.
    mixing_batched: bool = False

    def __init__(
        self,
        settings: EngineSettings,
        pipeline: DreamOmni2Pipeline,
        adapters: AdapterSet | FusedAdapters,
        translator: InstructionTranslator | None,
        placement: Placement | None = None,
    ):
        """Wrap parts that are already loaded and placed; `from_settings` is the usual way in.

        Without a `placement`, the parts are taken to be resident where they are.
        """
        self.settings = settings
        self.limits = settings.limits
        self.pipeline = pipeline
        self.adapters = adapters
        self.translator = translator
        self.placement = placement or Placement(
            settings.memory, pipeline.device, translator.device if translator else None
        )
        tiny = settings.preset is Preset.TINY
        scale = settings.bucket_scale or (TINY_BUCKET_SCALE if tiny else 1.0)
        self.buckets = KONTEXT_BUCKETS if scale == 1.0 else scale_buckets(KONTEXT_BUCKETS, scale)
        self.max_area = settings.max_area or (TINY_MAX_AREA if tiny else DEFAULT_MAX_AREA)
        #: The planner's prediction the engine was started under (None: not checked, e.g. on a CPU).
        self.memory_plan: MemoryPlan | None = None
        self.evaluations = install_counter(pipeline.transformer)
        self.profile = ProfileReport(settings.speed)
        self.warmup_s = 0.0
        #: The last job's GPU peaks, (device, "allocated" | "reserved") -> bytes; empty on a CPU.
        self.last_gpu_peak: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: EngineSettings | None = None) -> Engine:
        """Load every part the settings name (minutes with the real weights), placed as they say.

        On a GPU, the memory planner's prediction for the configured mode and image limit is checked
        against the free memory first (`DREAMOMNI2_MEMORY_CHECK`), so a worker that cannot fit refuses
        in seconds, naming a mode that would, instead of failing its first jobs.
        """
        settings = settings or EngineSettings()
        started = time.perf_counter()
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        translator_device = None
        if settings.translator:
            translator_device = device if settings.translator_device == "auto" else settings.translator_device
        layout = resolve_layout(settings)
        memory_plan, exact_mixing_fits = None, True
        if settings.memory_check:
            memory_plan, exact_mixing_fits = check_memory(settings, layout, device, translator_device)

        pipeline = DreamOmni2Pipeline.from_pretrained(layout.kontext, dtype=dtype)
        adapters = AdapterSet.load(pipeline, edit=layout.edit_lora, generation=layout.gen_lora)
        placement = Placement(settings.memory, device, translator_device)
        translator = None
        if translator_device is not None:
            translator = InstructionTranslator.from_pretrained(
                layout.vlm,
                # A swapped translator waits in host memory; a resident one loads straight onto its device.
                device="cpu" if placement.translator_residency() is Residency.SWAPPED else translator_device,
                dtype=resolve_dtype(settings.dtype, translator_device),
                max_new_tokens=settings.translator_budget,
            )
        engine = cls.assemble(settings, pipeline, adapters, translator, placement)
        engine.memory_plan = memory_plan
        if not exact_mixing_fits:
            # The batch-2 form peaks no higher than an ordinary job; the exact form keeps the source's
            # keys and values of every layer (about 2.7 GiB at 1 MP), which this card has no room for.
            engine.mixing_batched = True
            logger.warning(
                "Feature Mixing pairs run as one batch-2 call per step: the exact two-pass form does not "
                "fit this GPU's free memory next to the planned peak (see `python -m models plan "
                "--feature-mixing`)"
            )
        engine.warm_up()
        logger.info(
            "engine ready: preset=%s memory=%s device=%s dtype=%s translator=%s in %.1fs",
            settings.preset,
            settings.memory,
            device,
            dtype,
            translator_device or "off",
            time.perf_counter() - started,
        )
        return engine

    @classmethod
    def assemble(
        cls,
        settings: EngineSettings,
        pipeline: DreamOmni2Pipeline,
        adapters: AdapterSet | FusedAdapters,
        translator: InstructionTranslator | None,
        placement: Placement,
    ) -> Engine:
        """An engine from loaded parts (LoRAs loaded, weights in host memory or already on their device),
        placed as `placement`'s memory mode says. The GPU benches build random full-size parts and come
        in here, as `from_settings` does with the loaded ones."""
        pipeline.set_progress_bar_config(disable=True)
        placement.place_pipeline(pipeline)
        if translator is not None:
            placement.place_translator(translator)
        if settings.speed is not SpeedProfile.REFERENCE:
            # Compiled code and its autotuning results outlive the process here (the model volume).
            # Assigned, not defaulted: torch writes its /tmp default into the environment on first use.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(settings.torch_compile_dir)
        adapters, report = apply_profile(settings.speed, pipeline, adapters, placement.device)
        engine = cls(settings, pipeline, adapters, translator, placement)
        engine.profile = report
        return engine

    def warm_up(self) -> float:
        """Compile (or load from the compile cache) what a compiled profile serves, before any job.

        A 1-image edit (plain Kontext) and a 2-image edit (a LoRA): with dynamic shapes these cover
        every image count and bucket. Returns the seconds it took (0 for `reference`).
        """
        if self.settings.speed is SpeedProfile.REFERENCE:
            return 0.0
        started = time.perf_counter()
        side = round(self.max_area**0.5) // 16 * 16
        image = PIL.Image.new("RGB", (side, side), (127, 127, 127))
        params = JobParameters(instruction="warm-up", task=Task.EDIT, steps=2, seed=0, translate=False)
        for count in (1, 2):
            self.run([image] * count, params)
        self.warmup_s = time.perf_counter() - started
        logger.info("speed profile %s warmed up in %.1fs", self.settings.speed.value, self.warmup_s)
        return self.warmup_s

    def describe(self) -> dict:
        """What a worker reports about its models: the memory mode, devices and the planned peak."""
        info = self.placement.describe()
        info["speed"] = {
            "profile": self.profile.profile.value,
            "attention_backend": self.profile.attention_backend,
            "fused_adapter_weights": self.profile.fused_targets,
            "fp8_linears": self.profile.fp8_linears,
            "warmup_s": round(self.warmup_s, 1),
        }
        if self.translator is not None:
            # Qwen2VLImageProcessor (torchvision's resize, as the reference) or ...Pil (no torchvision).
            info["translator_image_processor"] = type(self.translator.processor.image_processor).__name__
        info["feature_mixing"] = "batched" if self.mixing_batched else "sequential"
        if self.memory_plan is not None:
            info["planned_peak_bytes"] = self.memory_plan.peak_bytes
            info["planned_images"] = self.memory_plan.images
        return info

    def prepare_images(self, images: Sequence[PIL.Image.Image]) -> list[PIL.Image.Image]:
        """Each upload once, as the reference scripts do before anything sees it: RGB over white with
        EXIF applied, then resized with Lanczos to the bucket nearest its raw aspect ratio. The
        translator and the pipeline both get these images."""
        return [resize_to_bucket(normalize_image(image), self.buckets) for image in images]

    def check(self, params: JobParameters, image_count: int) -> ResolvedJob:
        """Validate a request against this engine's limits without running it."""
        return resolve_job(params, image_count, self.limits)

    def run(
        self,
        images: Sequence[PIL.Image.Image | bytes],
        request: JobParameters | JobSpec,
        *,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> JobOutput:
        """Run one job: translate the instruction, pick the adapter, sample, decode.

        A `feature_mixing` job (no images) samples its source and target prompts as a pair instead
        (`models.mixing`); its output holds both images, the source first.

        ``request`` is the caller's parameters, or a queued job's spec (as the worker runs it); either
        way it is checked again here against this engine's limits. ``images`` are PIL images or
        encoded bytes (checked and decoded here). Raises `InvalidInput` for a request the model
        cannot run, `JobCanceled` when ``should_cancel()`` turns true (checked before sampling and
        after every denoising step) and `ModelOutOfMemory` when the accelerator runs out of memory.
        """
        params = request
        if isinstance(request, JobSpec):
            params = request.params
            if request.image_count != len(images):
                raise InvalidInput(
                    f"The job was queued with {request.image_count} image(s) but {len(images)} are stored.",
                    code=ErrorCode.INVALID_INPUT,
                    details={"expected": request.image_count, "found": len(images)},
                )
        job = self.check(params, len(images))
        pil_images = [
            load_image(image, limits=self.limits.image_limits(), label=f"image {n}")
            if isinstance(image, bytes | bytearray)
            else image
            for n, image in enumerate(images, start=1)
        ]
        progress = on_progress or (lambda stage, step, total: None)
        cancel = should_cancel or (lambda: False)
        with self._lock:
            gpus = self._gpus()
            for gpu in gpus:
                torch.cuda.reset_peak_memory_stats(gpu)
            try:
                if job.task is Task.FEATURE_MIXING:
                    return self._run_mixing(job, progress, cancel)
                return self._run(job, pil_images, progress, cancel)
            except torch.OutOfMemoryError as exc:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                what = (
                    "a Feature Mixing pair (two branches)"
                    if job.task is Task.FEATURE_MIXING
                    else f"{len(images)} input image(s)"
                )
                advice = "" if job.task is Task.FEATURE_MIXING else "send fewer reference images, or "
                raise ModelOutOfMemory(
                    f"The GPU ran out of memory for {what} in memory mode "
                    f"{self.settings.memory.value}; {advice}ask the operator for a "
                    "lower memory mode (`python -m models plan` shows what each needs).",
                    details={"images": len(images), "memory_mode": self.settings.memory.value},
                ) from exc
            finally:
                self.last_gpu_peak = {}
                for gpu in gpus:
                    self.last_gpu_peak[(gpu, "allocated")] = torch.cuda.max_memory_allocated(gpu)
                    self.last_gpu_peak[(gpu, "reserved")] = torch.cuda.max_memory_reserved(gpu)

    def _gpus(self) -> list[str]:
        """The CUDA devices this engine computes on (the pipeline's, and the translator's if apart)."""
        devices = [str(self.placement.device)]
        if self.placement.translator_device is not None:
            devices.append(str(self.placement.translator_device))
        found: list[str] = []
        for device in devices:
            if device.startswith("cuda") and not any(same_device(device, d) for d in found):
                found.append(device)
        return found

    def _run(
        self,
        job: ResolvedJob,
        uploads: list[PIL.Image.Image],
        progress: ProgressCallback,
        cancel: Callable[[], bool],
    ) -> JobOutput:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        images = self.prepare_images(uploads)

        progress("translate", 0, 1)
        prompt, translated, raw, fallback_reason, tokens = job.instruction, False, None, None, None
        if not job.translate:
            fallback_reason = "disabled_by_request"
        elif self.translator is None:
            fallback_reason = "disabled_by_deployment"
        else:
            with self.placement.running(Group.TRANSLATOR):
                translation = self.translator.translate(images, job.instruction, job.task)
            prompt, translated = translation.prompt, translation.translated
            raw, fallback_reason = translation.raw, translation.fallback_reason
            tokens = translation.generated_tokens
        timings["translate"] = time.perf_counter() - started
        progress("translate", 1, 1)
        if cancel():
            raise JobCanceled("The job was canceled before sampling started.")

        self.adapters.activate(job.adapter)
        seed = job.seed if job.seed is not None else secrets.randbelow(MAX_SEED + 1)
        generator = torch.Generator("cpu").manual_seed(seed)

        def on_step_end(pipe: DreamOmni2Pipeline, step: int, timestep: torch.Tensor, tensors: dict) -> dict:
            progress("denoise", step + 1, job.steps)
            if cancel():
                raise JobCanceled(f"The job was canceled after denoising step {step + 1} of {job.steps}.")
            return {}

        progress("encode", 0, 1)
        encode_started = time.perf_counter()
        # The prompt is encoded here rather than inside the pipeline call so that the text encoders
        # can leave the GPU before the transformer needs it; the pipeline takes the embeddings as is.
        with self.placement.running(Group.TEXT_ENCODERS):
            prompt_embeds, pooled_prompt_embeds, _ = self.pipeline.encode_prompt(
                prompt=prompt, prompt_2=None, device=self.pipeline.compute_device or self.pipeline.device
            )
        encode_prompt_s = time.perf_counter() - encode_started
        # The edit output takes image 1's bucketed size; a generation takes the requested one.
        height, width = job.height, job.width
        if job.task is Task.EDIT and images:
            width, height = images[0].size
        cache = step_cache_config(
            job.step_cache,
            first_block_threshold=self.settings.first_block_threshold,
            taylorseer_interval=self.settings.taylorseer_interval,
            dtype=self.pipeline.transformer.dtype,
        )
        self.evaluations.count = 0
        with self.placement.running(Group.TRANSFORMER), step_cache(self.pipeline.transformer, cache):
            output = self.pipeline(
                images=images,
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                height=height,
                width=width,
                num_inference_steps=job.steps,
                guidance_scale=job.guidance,
                generator=generator,
                max_area=self.max_area,
                # The images are on their buckets already; the pipeline keeps their size.
                resolution_buckets=None,
                callback_on_step_end=on_step_end,
            )
        progress("decode", 1, 1)
        timings.update(output.timings)
        timings["encode"] += encode_prompt_s
        timings["total"] = time.perf_counter() - started
        images = [output.images[0]]
        metadata = self._metadata(
            job,
            seed,
            images,
            timings,
            prompt=prompt,
            translated=translated,
            translation_raw=raw,
            translation_tokens=tokens,
            fallback_reason=fallback_reason,
        )
        return JobOutput(images=images, metadata=metadata)

    def _metadata(
        self,
        job: ResolvedJob,
        seed: int,
        images: list[PIL.Image.Image],
        timings: dict[str, float],
        **fields: object,
    ) -> JobMetadata:
        """What every job reports, plus the task's own `fields`."""
        return JobMetadata(
            adapter=job.adapter,
            task=job.task,
            seed=seed,
            steps=job.steps,
            guidance=job.guidance,
            width=images[0].width,
            height=images[0].height,
            image_count=job.image_count,
            speed_profile=self.settings.speed.value,
            step_cache=job.step_cache,
            transformer_evaluations=self.evaluations.count,
            timings=timings,
            **fields,
        )

    def _run_mixing(
        self, job: ResolvedJob, progress: ProgressCallback, cancel: Callable[[], bool]
    ) -> JobOutput:
        """A Feature Mixing pair: both prompts encoded, both branches sampled from one seed, both decoded.

        Base Kontext samples it (the job's adapter; the rule gives `base`), with no step cache and no
        translation: the prompts go to the text encoders as they are.
        """
        timings: dict[str, float] = {}
        started = time.perf_counter()
        if cancel():
            raise JobCanceled("The job was canceled before sampling started.")
        progress("encode", 0, 1)
        device = self.pipeline.compute_device or self.pipeline.device
        with self.placement.running(Group.TEXT_ENCODERS):
            source_embeds, source_pooled, _ = self.pipeline.encode_prompt(
                prompt=job.source_prompt, prompt_2=None, device=device
            )
            target_embeds, target_pooled, _ = self.pipeline.encode_prompt(
                prompt=job.target_prompt, prompt_2=None, device=device
            )
        encode_prompt_s = time.perf_counter() - started
        if cancel():
            raise JobCanceled("The job was canceled before sampling started.")

        self.adapters.activate(job.adapter)
        seed = job.seed if job.seed is not None else secrets.randbelow(MAX_SEED + 1)
        generator = torch.Generator("cpu").manual_seed(seed)
        config = MixingConfig.from_job(job)
        if self.mixing_batched:
            config = dataclasses.replace(config, batched=True)

        def on_step_end(pipe: DreamOmni2Pipeline, step: int, timestep: torch.Tensor, tensors: dict) -> dict:
            progress("denoise", step + 1, job.steps)
            if cancel():
                raise JobCanceled(f"The job was canceled after denoising step {step + 1} of {job.steps}.")
            return {}

        self.evaluations.count = 0
        with self.placement.running(Group.TRANSFORMER):
            output = generate_pair(
                self.pipeline,
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
                max_area=self.max_area,
                callback_on_step_end=on_step_end,
            )
        progress("decode", 1, 1)
        timings.update(output.timings)
        timings["encode"] += encode_prompt_s
        timings["total"] = time.perf_counter() - started
        images = list(output.images)
        metadata = self._metadata(
            job,
            seed,
            images,
            timings,
            prompt=job.source_prompt,
            translated=False,
            fallback_reason=None,
            source_prompt=job.source_prompt,
            target_prompt=job.target_prompt,
            attribute=job.attribute,
            mixing=config.describe(output.mixed_steps, output.mixed_layers),
        )
        return JobOutput(images=images, metadata=metadata)


def check_memory(
    settings: EngineSettings, layout: ModelLayout, device: str, translator_device: str | None
) -> tuple[MemoryPlan | None, bool]:
    """The planner's prediction for this configuration, refused with `MemoryPlanError` if it cannot fit,
    and whether a Feature Mixing pair in its exact (sequential) form fits as well.

    Checked only where the pipeline runs on a CUDA GPU; returns (None, True) elsewhere. The free
    memory of every GPU the plan uses is read with the CUDA context already created.
    """
    if is_cpu(device) or not torch.cuda.is_available():
        return None, True
    from models.memory import check_fit, fits, layout_sizes, plan_memory

    sizes = layout_sizes(layout.kontext, layout.edit_lora, layout.gen_lora, layout.vlm)
    free = {}
    for name in {device, translator_device} - {None}:
        if not is_cpu(name):
            free[str(name)] = torch.cuda.mem_get_info(torch.device(name))[0]
    size = round((settings.max_area or DEFAULT_MAX_AREA) ** 0.5) // 16 * 16
    kwargs = dict(
        size=size,
        device=device,
        translator_device=translator_device,
        new_tokens=settings.translator_budget,
        sizes=sizes,
    )
    plan = check_fit(settings.memory, settings.limits.max_images, free, **kwargs)
    return plan, fits(plan_memory(settings.memory, 0, feature_mixing=True, **kwargs), free)

"""The engine: pipeline, adapters and translator held once, one job at a time."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from api_schemas.errors import JobCanceled, ModelOutOfMemory
from api_schemas.images import load_image
from api_schemas.jobs import JobMetadata, JobParameters, ResolvedJob, resolve_job
from models.adapters import AdapterSet
from models.pipeline import DEFAULT_MAX_AREA, KONTEXT_BUCKETS, DreamOmni2Pipeline, scale_buckets
from models.settings import EngineSettings, Offload, Preset, resolve_device, resolve_dtype
from models.translator import InstructionTranslator

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
    image: PIL.Image.Image
    metadata: JobMetadata


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

    def __init__(
        self,
        settings: EngineSettings,
        pipeline: DreamOmni2Pipeline,
        adapters: AdapterSet,
        translator: InstructionTranslator | None,
    ):
        """Wrap parts that are already loaded and placed; `from_settings` is the usual way in."""
        self.settings = settings
        self.limits = settings.limits
        self.pipeline = pipeline
        self.adapters = adapters
        self.translator = translator
        tiny = settings.preset is Preset.TINY
        scale = settings.bucket_scale or (TINY_BUCKET_SCALE if tiny else 1.0)
        self.buckets = KONTEXT_BUCKETS if scale == 1.0 else scale_buckets(KONTEXT_BUCKETS, scale)
        self.max_area = settings.max_area or (TINY_MAX_AREA if tiny else DEFAULT_MAX_AREA)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: EngineSettings | None = None) -> Engine:
        """Load every part the settings name (minutes with the real weights), placed as they say."""
        settings = settings or EngineSettings()
        started = time.perf_counter()
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        layout = resolve_layout(settings)
        pipeline = DreamOmni2Pipeline.from_pretrained(layout.kontext, dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        adapters = AdapterSet.load(pipeline, edit=layout.edit_lora, generation=layout.gen_lora)
        if settings.offload is Offload.MODEL:
            pipeline.enable_model_cpu_offload(device=device)
        elif settings.offload is Offload.SEQUENTIAL:
            pipeline.enable_sequential_cpu_offload(device=device)
        else:
            pipeline.to(device)

        translator = None
        if settings.translator:
            translator_device = device if settings.translator_device == "auto" else settings.translator_device
            translator = InstructionTranslator.from_pretrained(
                layout.vlm,
                device=translator_device,
                dtype=resolve_dtype(settings.dtype, translator_device),
                max_new_tokens=settings.translator_max_new_tokens,
                max_image_pixels=settings.translator_max_image_pixels,
            )
        logger.info(
            "engine ready: preset=%s device=%s dtype=%s offload=%s translator=%s in %.1fs",
            settings.preset,
            device,
            dtype,
            settings.offload,
            translator.device if translator else "off",
            time.perf_counter() - started,
        )
        return cls(settings, pipeline, adapters, translator)

    def check(self, params: JobParameters, image_count: int) -> ResolvedJob:
        """Validate a request against this engine's limits without running it."""
        return resolve_job(params, image_count, self.limits)

    def run(
        self,
        images: Sequence[PIL.Image.Image | bytes],
        params: JobParameters,
        *,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> JobOutput:
        """Run one job: translate the instruction, pick the adapter, sample, decode.

        ``images`` are PIL images or encoded bytes (checked and decoded here). Raises `InvalidInput`
        for a request the model cannot run, `JobCanceled` when ``should_cancel()`` turns true (checked
        before sampling and after every denoising step) and `ModelOutOfMemory` when the accelerator
        runs out of memory.
        """
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
            try:
                return self._run(job, pil_images, progress, cancel)
            except torch.OutOfMemoryError as exc:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise ModelOutOfMemory(
                    f"The GPU ran out of memory for {len(images)} input image(s); "
                    "send fewer or smaller reference images, or run with DREAMOMNI2_OFFLOAD=model.",
                ) from exc
            finally:
                # Offload hooks must be reset even when a job stops half-way.
                self.pipeline.maybe_free_model_hooks()

    def _run(
        self,
        job: ResolvedJob,
        images: list[PIL.Image.Image],
        progress: ProgressCallback,
        cancel: Callable[[], bool],
    ) -> JobOutput:
        timings: dict[str, float] = {}
        started = time.perf_counter()

        progress("translate", 0, 1)
        prompt, translated, raw, fallback_reason = job.instruction, False, None, None
        if not job.translate:
            fallback_reason = "disabled_by_request"
        elif self.translator is None:
            fallback_reason = "disabled_by_deployment"
        else:
            translation = self.translator.translate(images, job.instruction, job.task)
            prompt, translated = translation.prompt, translation.translated
            raw, fallback_reason = translation.raw, translation.fallback_reason
        timings["translate"] = time.perf_counter() - started
        progress("translate", 1, 1)
        if cancel():
            raise JobCanceled("The job was canceled before sampling started.")

        self.adapters.activate(job.adapter)
        seed = job.seed if job.seed is not None else secrets.randbelow(2**63)
        generator = torch.Generator("cpu").manual_seed(seed)

        def on_step_end(pipe: DreamOmni2Pipeline, step: int, timestep: torch.Tensor, tensors: dict) -> dict:
            progress("denoise", step + 1, job.steps)
            if cancel():
                raise JobCanceled(f"The job was canceled after denoising step {step + 1} of {job.steps}.")
            return {}

        progress("encode", 0, 1)
        output = self.pipeline(
            images=images,
            prompt=prompt,
            height=job.height,
            width=job.width,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            generator=generator,
            max_area=self.max_area,
            resolution_buckets=self.buckets,
            callback_on_step_end=on_step_end,
        )
        progress("decode", 1, 1)
        timings.update(output.timings)
        timings["total"] = time.perf_counter() - started
        image = output.images[0]
        metadata = JobMetadata(
            prompt=prompt,
            translated=translated,
            translation_raw=raw,
            fallback_reason=fallback_reason,
            adapter=job.adapter,
            task=job.task,
            seed=seed,
            steps=job.steps,
            guidance=job.guidance,
            width=image.width,
            height=image.height,
            image_count=job.image_count,
            timings=timings,
        )
        return JobOutput(image=image, metadata=metadata)

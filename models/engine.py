"""The engine: pipeline, adapters and translator held once, one job at a time."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import PIL.Image
import torch

from api_schemas.common import Task
from api_schemas.errors import ErrorCode, InvalidInput, ModelOutOfMemory
from api_schemas.images import load_image, normalize_image
from api_schemas.jobs import JobParameters, ResolvedJob, resolve_job
from models.adapters import AdapterSet
from models.buckets import DEFAULT_MAX_AREA, KONTEXT_BUCKETS, resize_to_bucket, scale_buckets
from models.failures import DeviceFailure, DeviceLost, classify, release_memory, summary
from models.layout import MemoryCheck, batch_size, check_memory, resolve_layout
from models.modes import Residency, same_device
from models.pipeline import DreamOmni2Pipeline
from models.placement import Placement
from models.profiles import SpeedProfile
from models.sampling import JobOutput, ProgressCallback, run_job
from models.settings import EngineSettings, Preset, resolve_device, resolve_dtype
from models.speed import (
    FusedAdapters,
    ProfileReport,
    apply_profile,
    compile_preflight,
    install_counter,
    require_supported,
)
from models.text_jobs import run_text_job
from models.translator import InstructionTranslator
from models.user_loras import load_user_loras

if TYPE_CHECKING:
    from models.memory import MemoryPlan

logger = logging.getLogger(__name__)

#: The tiny preset's smaller resolutions: 1/16 of the real buckets and a 64x64 output area.
TINY_BUCKET_SCALE = 1 / 16
TINY_MAX_AREA = 64 * 64


def freeze(*modules: torch.nn.Module | None) -> None:
    """No parameter of `modules` takes part in autograd: inference never builds a graph through them."""
    for module in modules:
        if module is not None:
            module.requires_grad_(False)


class Engine:
    """Holds FLUX.1 Kontext, both DreamOmni2 LoRAs and the translator; runs one job at a time.

    Build it once per process (loading takes minutes with the real weights) and call `run` per job.
    Every model is frozen and every job runs without autograd.
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
        # Whatever built the parts (a loader, a speed profile fusing q/k/v), nothing trains here.
        freeze(*self.models().values())
        tiny = settings.preset is Preset.TINY
        scale = settings.bucket_scale or (TINY_BUCKET_SCALE if tiny else 1.0)
        self.buckets = KONTEXT_BUCKETS if scale == 1.0 else scale_buckets(KONTEXT_BUCKETS, scale)
        self.max_area = settings.max_area or (TINY_MAX_AREA if tiny else DEFAULT_MAX_AREA)
        #: The planner's prediction the engine was started under (None: not checked, e.g. on a CPU).
        self.memory_plan: MemoryPlan | None = None
        #: The most images of one job sampled together (`DREAMOMNI2_BATCH_IMAGES`; `auto` is 1 until the
        #: start-up memory check finds room for more).
        self.batch_size = 1 if settings.batch_images == "auto" else batch_size(settings)
        self.evaluations = install_counter(pipeline.transformer)
        self.profile = ProfileReport(settings.speed)
        self.warmup_s = 0.0
        #: The last job's GPU peaks, (device, "allocated" | "reserved") -> bytes; empty on a CPU.
        self.last_gpu_peak: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def models(self) -> dict[str, torch.nn.Module | None]:
        """Every network the engine holds, by name (None: not loaded)."""
        pipeline = self.pipeline
        return {
            "transformer": pipeline.transformer,
            "vae": pipeline.vae,
            "clip_l": pipeline.text_encoder,
            "t5_xxl": pipeline.text_encoder_2,
            "translator": self.translator.model if self.translator is not None else None,
        }

    @classmethod
    def from_settings(cls, settings: EngineSettings | None = None) -> Engine:
        """Load every part the settings name (minutes with the real weights), placed as they say.

        On a GPU, the memory planner's prediction for the configured mode and image limit is checked
        against the free GPU memory and the host memory available first (`DREAMOMNI2_MEMORY_CHECK`), so
        a worker that cannot fit refuses in seconds, naming a mode that would, instead of failing its
        first jobs.
        """
        settings = settings or EngineSettings()
        started = time.perf_counter()
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        translator_device = None
        if settings.translator:
            translator_device = device if settings.translator_device == "auto" else settings.translator_device
        layout = resolve_layout(settings)
        memory = check_memory(settings, layout, device, translator_device) if settings.memory_check else None
        memory = memory or MemoryCheck()

        pipeline = DreamOmni2Pipeline.from_pretrained(layout.kontext, dtype=dtype)
        user_loras = load_user_loras(settings, pipeline)
        adapters = AdapterSet.load(
            pipeline, edit=layout.edit_lora, generation=layout.gen_lora, user=user_loras
        )
        freeze(pipeline.transformer, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2)
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
            freeze(translator.model)
        engine = cls.assemble(
            settings, pipeline, adapters, translator, placement, device_spare_bytes=memory.spare_bytes
        )
        engine.memory_plan = memory.plan
        if memory.plan is not None:
            engine.batch_size = memory.batch
        if not memory.exact_mixing_fits:
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
        device_spare_bytes: int = 0,
    ) -> Engine:
        """An engine from loaded parts (LoRAs loaded, weights in host memory or already on their device),
        placed as `placement`'s memory mode says. The GPU benches build random full-size parts and come
        in here, as `from_settings` does with the loaded ones. `device_spare_bytes`: memory the
        pipeline's GPU has beyond the planned peak, where a compiled profile keeps the pristine copies
        of the weights its adapters rewrite (if they fit; an adapter switch is then a copy on the GPU).

        A compiled profile first checks that this machine can compile for its device (`compile_preflight`);
        where it cannot (no C compiler for Triton, say), the worker serves with `reference` and says why
        in its logs and readiness info instead of failing its warm-up on every start.
        """
        pipeline.set_progress_bar_config(disable=True)
        placement.place_pipeline(pipeline)
        if translator is not None:
            placement.place_translator(translator)
        report = ProfileReport(settings.speed)
        if settings.speed is not SpeedProfile.REFERENCE:
            # Compiled code and its autotuning results outlive the process here (the model volume).
            # Assigned, not defaulted: torch writes its /tmp default into the environment on first use.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(settings.torch_compile_dir)
            require_supported(settings.speed, placement.device)
            problem = compile_preflight(placement.device)
            if problem is None:
                adapters, report = apply_profile(
                    settings.speed, pipeline, adapters, placement.device, device_spare_bytes
                )
            else:
                report.fall_back("reference", problem)
                logger.error(
                    "DREAMOMNI2_SPEED=%s cannot compile on this machine (%s); serving with the reference "
                    "profile instead. Give the worker a C compiler and the Python headers (the worker "
                    "image has them) or set DREAMOMNI2_SPEED=reference.",
                    settings.speed.value,
                    problem,
                )
        engine = cls(settings, pipeline, adapters, translator, placement)
        engine.profile = report
        return engine

    def warm_up(self) -> float:
        """Compile (or load from the compile cache) what a compiled profile serves, before any job.

        A 1-image edit (plain Kontext) and a 2-image edit (a LoRA): with dynamic shapes these cover
        every image count and bucket. Returns the seconds it took (0 when nothing is compiled). A
        warm-up that fails to compile is not fatal: the compiled blocks then run eagerly (same
        weights, no compile), and the worker reports it; a sticky device error is (`DeviceLost`).
        """
        if not self.profile.compiled:
            return 0.0
        started = time.perf_counter()
        try:
            self._warm_up_jobs()
        except DeviceLost:
            raise
        except Exception as exc:
            problem = summary(exc)
            logger.exception(
                "warm-up of DREAMOMNI2_SPEED=%s failed; its blocks run eagerly", self.profile.profile
            )
            torch.compiler.set_stance("force_eager")
            self.profile.fall_back("eager", problem)
            self._warm_up_jobs()
        self.warmup_s = time.perf_counter() - started
        logger.info("speed profile %s warmed up in %.1fs", self.settings.speed.value, self.warmup_s)
        return self.warmup_s

    def _warm_up_jobs(self) -> None:
        side = round(self.max_area**0.5) // 16 * 16
        image = PIL.Image.new("RGB", (side, side), (127, 127, 127))
        for count in (1, 2):
            # A batch of one is a shape of its own to the compiler; two covers every larger batch.
            for num_images in sorted({1, min(2, self.batch_size)}):
                params = JobParameters(
                    instruction="warm-up",
                    task=Task.EDIT,
                    steps=2,
                    seed=0,
                    translate=False,
                    num_images=num_images,
                )
                self.run([image] * count, params)

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
        if isinstance(self.adapters, FusedAdapters):
            # Where adapter switches copy the pristine weights from: the GPU itself, or host blocks.
            info["speed"]["pristine_weights"] = self.adapters.pristine_device
        if self.profile.fallback is not None:
            info["speed"].update(fallback=self.profile.fallback, error=self.profile.error)
        if self.translator is not None:
            # Qwen2VLImageProcessor (torchvision's resize, as the reference) or ...Pil (no torchvision).
            info["translator_image_processor"] = type(self.translator.processor.image_processor).__name__
        info["feature_mixing"] = "batched" if self.mixing_batched else "sequential"
        if self.adapters.user is not None:
            info["loras"] = self.adapters.user.describe()
        info["batch_images"] = self.batch_size
        if self.memory_plan is not None:
            info["planned_peak_bytes"] = self.memory_plan.peak_bytes
            info["planned_images"] = self.memory_plan.images
            info["planned_batch"] = self.memory_plan.batch
            info["planned_host_bytes"] = self.memory_plan.host_bytes
        return info

    def prepare_images(self, images: Sequence[PIL.Image.Image]) -> list[PIL.Image.Image]:
        """Each upload once, as the reference scripts do before anything sees it: RGB over white with
        EXIF applied, then resized with Lanczos to the bucket nearest its raw aspect ratio. The
        translator and the pipeline both get these images."""
        return [resize_to_bucket(normalize_image(image), self.buckets) for image in images]

    def check(self, params: JobParameters, image_count: int) -> ResolvedJob:
        """Resolve a request against this engine's limits without running it."""
        return resolve_job(params, image_count, self.limits)

    def run(
        self,
        images: Sequence[PIL.Image.Image | bytes],
        job: ResolvedJob | JobParameters,
        *,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        preview_every: int = 0,
    ) -> JobOutput:
        """Run one job: translate the instruction, pick the adapter, sample, decode.

        ``job`` is a resolved job (`api_schemas.jobs.resolve_job`: what the gateway queued and the
        worker hands over as it is) or a caller's parameters, resolved here once. A `feature_mixing`
        job (no images) samples its source and target prompts as a pair instead (`models.mixing`);
        its output holds both images, the source first. A `judge` or `mixing_prompts` job samples no
        image: the translator's model writes its JSON (`models.text_jobs`). ``images`` are PIL images
        or encoded bytes (checked and decoded here).

        With ``preview_every`` (N > 0), every Nth denoising step's progress carries ``preview=``: the
        current estimate of the image (a Feature Mixing pair: both, side by side) as a small JPEG data
        URI (`models.preview`), from the latents without the VAE; the sampled images stay the same.

        Raises `InvalidInput` for a job this engine cannot run (more images than its limit, or other
        than the job was resolved for), `JobCanceled` when ``should_cancel()`` turns true (checked
        before sampling and after every denoising step), `ModelOutOfMemory` when the accelerator runs
        out of memory (in any of its spellings; the job's memory is given back first, so the next job
        runs), and `DeviceLost` after a sticky device error (no later job can run in this process).
        """
        if isinstance(job, JobParameters):
            job = self.check(job, len(images))
        else:
            self._admit(job, len(images))
        pil_images = [
            load_image(image, limits=self.limits.image_limits(), label=f"image {n}")
            if isinstance(image, bytes | bytearray)
            else image
            for n, image in enumerate(images, start=1)
        ]
        progress = on_progress or (lambda stage, step, total, **preview: None)
        cancel = should_cancel or (lambda: False)
        with self._lock:
            gpus = self._gpus()
            for gpu in gpus:
                torch.cuda.reset_peak_memory_stats(gpu)
            failure = None
            try:
                if job.task.writes_text:
                    return run_text_job(self, job, pil_images, progress, cancel)
                return run_job(self, job, pil_images, progress, cancel, preview_every)
            except Exception as exc:
                failure = classify(exc)
                if failure is None:
                    raise
                problem = summary(exc)
                logger.error("job failed on the device (%s): %s", failure.value, problem)
            finally:
                self.last_gpu_peak = {}
                for gpu in gpus:
                    self.last_gpu_peak[(gpu, "allocated")] = torch.cuda.max_memory_allocated(gpu)
                    self.last_gpu_peak[(gpu, "reserved")] = torch.cuda.max_memory_reserved(gpu)
            # Out of the `except` block: the exception, its traceback and the job's tensors its frames
            # held are gone, so the memory can really be given back.
            if failure is DeviceFailure.STICKY:
                raise DeviceLost(f"The GPU is in an unrecoverable state after: {problem}")
            release_memory(gpus)
            raise self._out_of_memory(job)

    def _admit(self, job: ResolvedJob, image_count: int) -> None:
        """A resolved job fits this engine: the images it was resolved for, within the image limit the
        memory was planned for, and steps within this deployment's limits."""
        if job.image_count != image_count:
            raise InvalidInput(
                f"The job was queued with {job.image_count} image(s) but {image_count} are stored.",
                code=ErrorCode.INVALID_INPUT,
                details={"expected": job.image_count, "found": image_count},
            )
        if (
            image_count > self.limits.max_images_for(job.task)
            or job.num_images > self.limits.max_num_images
            or (job.count or 0) > self.limits.max_mixing_prompts
            # A text job samples nothing: its steps are 0.
            or not (job.task.writes_text or self.limits.min_steps <= job.steps <= self.limits.max_steps)
        ):
            # Resolved under other limits (a gateway configured apart from this worker): check it again.
            resolve_job(job.parameters(), image_count, self.limits)

    def _out_of_memory(self, job: ResolvedJob) -> ModelOutOfMemory:
        pair = job.task is Task.FEATURE_MIXING
        what = "a Feature Mixing pair (two branches)" if pair else f"{job.image_count} input image(s)"
        advice = "" if pair else "send fewer reference images, or "
        return ModelOutOfMemory(
            f"The GPU ran out of memory for {what} in memory mode {self.settings.memory.value}; {advice}"
            "ask the operator for a lower memory mode (`python -m models plan` shows what each needs).",
            details={"images": job.image_count, "memory_mode": self.settings.memory.value},
        )

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

"""What the gateway tells about itself: the deployment's limits and choices (`GET /v1/service`), and
whether it can take jobs (`/readyz`)."""

from __future__ import annotations

from api_schemas.api import OutputFormat, Readiness, ServiceInfo, WorkerCounts
from api_schemas.common import StepCache
from api_schemas.loras import MAX_LORA_SCALE, MIN_LORA_SCALE, lora_catalogue
from app.service import JobService


def describe_service(service: JobService, auth_required: bool) -> ServiceInfo:
    """The deployment's limits and choices, as a client needs them before it submits (the page's)."""
    limits = service.limits
    return ServiceInfo(
        auth_required=auth_required,
        max_images=limits.max_images,
        max_num_images=limits.max_num_images,
        max_image_bytes=limits.max_image_bytes,
        max_request_bytes=service.settings.max_request_bytes,
        max_instruction_chars=limits.max_instruction_chars,
        min_steps=limits.min_steps,
        max_steps=limits.max_steps,
        default_steps=limits.default_steps,
        min_guidance=limits.min_guidance,
        max_guidance=limits.max_guidance,
        default_guidance=limits.default_guidance,
        min_size=limits.min_size,
        max_size=limits.max_size,
        default_size=limits.default_size,
        max_aspect_ratio=limits.max_aspect_ratio,
        output_formats=list(OutputFormat),
        # `none` is always allowed; the others in the order the deployment lists them.
        step_caches=[StepCache.NONE, *(c for c in limits.step_caches if c is not StepCache.NONE)],
        default_step_cache=limits.step_cache,
        loras=lora_catalogue(limits.loras),
        max_loras_per_job=limits.max_loras_per_job,
        min_lora_scale=MIN_LORA_SCALE,
        max_lora_scale=MAX_LORA_SCALE,
    )


def readiness(service: JobService) -> tuple[Readiness, bool]:
    """Whether this gateway can take jobs (Redis answers), with the ready workers (models loaded,
    consumer consuming) counted by memory mode and by speed-profile fallback."""
    try:
        service.store.redis.ping()
        workers = list(service.store.workers.workers())
        modes: dict[str, int] = {}
        fallbacks: dict[str, int] = {}
        # Ready: models loaded and the consumer taking messages (a worker announced before
        # `consuming` existed counts as consuming).
        ready = [w for w in workers if w.get("ready") and w.get("consuming", True)]
        for worker in ready:
            models = worker.get("memory") or {}
            if mode := models.get("mode"):
                modes[mode] = modes.get(mode, 0) + 1
            if fallback := (models.get("speed") or {}).get("fallback"):
                fallbacks[fallback] = fallbacks.get(fallback, 0) + 1
        counts = WorkerCounts(
            up=len(workers),
            ready=len(ready),
            memory_modes=modes,
            speed_fallbacks=fallbacks,
        )
        return Readiness(
            status="ready", redis="ok", workers=counts, queue_depth=service.store.jobs.queue_depth()
        ), True
    except Exception as exc:
        return Readiness(status="unavailable", redis=f"{type(exc).__name__}: {exc}"), False

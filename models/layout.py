"""Where a worker's weights are, and whether they fit its machine before any of them is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.buckets import DEFAULT_MAX_AREA
from models.modes import is_cpu, same_device
from models.settings import EngineSettings, Preset, resolve_dtype

if TYPE_CHECKING:
    from models.memory import MemoryPlan


@dataclass(frozen=True)
class ModelLayout:
    """Where each part's weights are: the published layout, from the Hub or local folders."""

    kontext: str
    edit_lora: Path
    gen_lora: Path
    vlm: Path


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


@dataclass(frozen=True)
class MemoryCheck:
    """The start-up check's findings: the plan the worker runs under (None: not checked, e.g. on a
    CPU), whether a Feature Mixing pair's exact form fits too, and the pipeline GPU's memory left
    over beyond the planned peak and its headroom (where a compiled profile may keep its pristine
    adapter weights). `batch`: the output images of one job the worker samples together (the plan is
    the one of that batch)."""

    plan: MemoryPlan | None = None
    exact_mixing_fits: bool = True
    spare_bytes: int = 0
    batch: int = 1


def check_memory(
    settings: EngineSettings, layout: ModelLayout, device: str, translator_device: str | None
) -> MemoryCheck:
    """The planner's prediction for this configuration, refused with `MemoryPlanError` if it cannot fit
    the free GPU memory or the host memory available, and what else fits next to it.

    Checked only where the pipeline runs on a CUDA GPU; nothing is checked elsewhere. The free memory
    of every GPU the plan uses is read with the CUDA context already created.
    """
    if is_cpu(device) or not torch.cuda.is_available():
        return MemoryCheck()
    from models.memory import (
        FIT_HEADROOM,
        available_host_bytes,
        check_fit,
        fits,
        layout_sizes,
        max_batch_that_fits,
        plan_memory,
    )
    from models.memory.user_loras import registered_lora_sizes

    dtype = resolve_dtype(settings.dtype, device)
    sizes = layout_sizes(layout.kontext, layout.edit_lora, layout.gen_lora, layout.vlm, dtype=dtype)
    free = {}
    for name in {device, translator_device} - {None}:
        if not is_cpu(name):
            free[str(name)] = torch.cuda.mem_get_info(torch.device(name))[0]
    host_free = available_host_bytes()
    size = round((settings.max_area or DEFAULT_MAX_AREA) ** 0.5) // 16 * 16
    kwargs = dict(
        size=size,
        device=device,
        translator_device=translator_device,
        new_tokens=settings.translator_budget,
        sizes=sizes,
        speed=settings.speed,
        user_loras=registered_lora_sizes(settings, dtype, sizes.lora_targets),
        text_jobs=settings.limits,
    )
    images = settings.limits.max_images
    plan = check_fit(settings.memory, images, free, host_free, **kwargs)
    batch = batch_size(settings)
    if settings.batch_images == "auto":
        batch = max_batch_that_fits(settings.memory, images, free, batch, host_free, **kwargs)
    if batch > 1:
        # A batch the operator asked for must fit as a one-image job must; `auto` fits by construction.
        plan = check_fit(settings.memory, images, free, host_free, batch=batch, **kwargs)
    peak = next((n for d, n in plan.devices.items() if same_device(d, device)), 0)
    free_here = next(n for d, n in free.items() if same_device(d, device))
    return MemoryCheck(
        plan=plan,
        exact_mixing_fits=fits(plan_memory(settings.memory, 0, feature_mixing=True, **kwargs), free),
        spare_bytes=max(0, int(free_here - peak * (1 + FIT_HEADROOM))),
        batch=batch,
    )


def batch_size(settings: EngineSettings) -> int:
    """The most output images of one job sampled together, before any memory check: the number set,
    capped at `DREAMOMNI2_MAX_NUM_IMAGES`; `auto`: the cap (the check then lowers it to what fits)."""
    cap = settings.limits.max_num_images
    return cap if settings.batch_images == "auto" else min(settings.batch_images, cap)

"""Fitting a machine: the plan's GPU peaks against the free GPU memory, its host bytes against the host's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.memory.plan import MemoryPlan, plan_memory
from models.memory.sizes import GiB
from models.modes import MemoryMode, same_device

#: Spare memory the start-up check keeps beyond the prediction (allocator fragmentation, cuBLAS and
#: attention workspaces, which the fake-tensor trace cannot see).
FIT_HEADROOM = 0.05
#: Host memory a worker needs besides the weights it keeps there: Python, torch and the CUDA
#: libraries, the loaders' transients, image buffers. An allowance, not a measurement.
HOST_OVERHEAD_BYTES = 4 * GiB


def fits(plan: MemoryPlan, free: dict[str, int], host_free: int | None = None) -> bool:
    """Whether every device's predicted peak, with `FIT_HEADROOM`, fits its free bytes, and (when
    `host_free` is known) the plan's host bytes plus `HOST_OVERHEAD_BYTES` fit the host's."""
    for d, need in plan.devices.items():
        have = next((n for k, n in free.items() if same_device(k, d)), None)
        if have is not None and need * (1 + FIT_HEADROOM) > have:
            return False
    return host_free is None or plan.host_bytes + HOST_OVERHEAD_BYTES <= host_free


def max_images_that_fit(
    mode: MemoryMode, free: dict[str, int], limit: int, host_free: int | None = None, **plan_kwargs: Any
) -> int | None:
    """The most input images (0..limit) a job may have in `mode` and still fit; None if none does."""
    best = None
    for images in range(limit + 1):
        if not fits(plan_memory(mode, images, **plan_kwargs), free, host_free):
            break
        best = images
    return best


def max_batch_that_fits(
    mode: MemoryMode,
    images: int,
    free: dict[str, int],
    limit: int,
    host_free: int | None = None,
    **plan_kwargs: Any,
) -> int:
    """The most output images (1..limit) a job of `images` inputs may sample together in `mode` and
    still fit; 1 when even two do not (one image at a time is what `check_fit` checked)."""
    best = 1
    for batch in range(2, limit + 1):
        if not fits(plan_memory(mode, images, batch=batch, **plan_kwargs), free, host_free):
            break
        best = batch
    return best


class MemoryPlanError(RuntimeError):
    """The configured memory mode cannot fit the GPU or the host; the message names what would."""


def check_fit(
    mode: MemoryMode, images: int, free: dict[str, int], host_free: int | None = None, **plan_kwargs: Any
) -> MemoryPlan:
    """Return the plan if it fits `free` (device -> bytes) and `host_free` (bytes, None: unknown);
    raise `MemoryPlanError` naming a mode or an image limit that fits."""
    plan = plan_memory(mode, images, **plan_kwargs)
    if fits(plan, free, host_free):
        return plan
    size = plan_kwargs.get("size", 1024)
    short = [
        f"{d} needs {need / GiB:.1f} GiB (+{FIT_HEADROOM:.0%} headroom) but has {free[k] / GiB:.1f} GiB free"
        for d, need in plan.devices.items()
        for k in free
        if same_device(k, d) and need * (1 + FIT_HEADROOM) > free[k]
    ]
    if host_free is not None and plan.host_bytes + HOST_OVERHEAD_BYTES > host_free:
        short.append(
            f"the host needs {plan.host_bytes / GiB:.1f} GiB for the models it keeps in (pinned) host "
            f"memory (+{HOST_OVERHEAD_BYTES / GiB:.0f} GiB for the process) but has "
            f"{host_free / GiB:.1f} GiB available"
        )
    batch = plan_kwargs.get("batch", 1)
    batched = f" and {batch} output images sampled together" if batch > 1 else ""
    message = (
        f"DREAMOMNI2_MEMORY={mode.value} does not fit: with {images} input image(s) at {size}x{size}"
        f"{batched}, " + "; ".join(short) + "."
    )
    options = []
    for other in MemoryMode:
        if other is mode:
            continue
        other_plan = plan_memory(other, images, **plan_kwargs)
        if fits(other_plan, free, host_free):
            options.append(
                f"DREAMOMNI2_MEMORY={other.value} fits (predicted {other_plan.peak_bytes / GiB:.1f} GiB "
                f"on the GPU, {other_plan.host_bytes / GiB:.1f} GiB of host memory)"
            )
            break
    if batch > 1:
        options.insert(0, "a smaller DREAMOMNI2_BATCH_IMAGES (or `auto`) samples fewer images together")
    if images:
        fewer = max_images_that_fit(mode, free, images - 1, host_free, **plan_kwargs)
        if fewer is not None:
            options.append(f"{mode.value} fits with DREAMOMNI2_MAX_IMAGES={fewer}")
    if not options:
        options.append(
            "No mode fits this machine at this image limit; put the translator on another device "
            "(DREAMOMNI2_TRANSLATOR_DEVICE=cuda:1 or cpu), lower DREAMOMNI2_MAX_IMAGES, or give the "
            "worker more host memory"
        )
    raise MemoryPlanError(
        message
        + " "
        + "; ".join(options)
        + ". See `python -m models plan`; DREAMOMNI2_MEMORY_CHECK=false starts anyway."
    )


def available_host_bytes(root: Path = Path("/")) -> int | None:
    """Host memory this process may still use: the kernel's MemAvailable, or less where a cgroup (a
    container's memory limit) allows less. None where neither can be read."""
    found: list[int] = []
    meminfo = root / "proc" / "meminfo"
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = root / "sys" / "fs" / "cgroup"
    for limit_name, usage_name in (
        ("memory.max", "memory.current"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),  # cgroup v1
    ):
        try:
            limit = (cgroup / limit_name).read_text().strip()
            usage = int((cgroup / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        # v2 says "max" for no limit; v1 a huge number.
        if limit != "max" and int(limit) < 1 << 60:
            found.append(max(0, int(limit) - usage))
        break
    return min(found) if found else None

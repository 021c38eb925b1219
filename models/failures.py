"""What an accelerator failure means for a worker: out of memory (free, fail the job, go on) or a sticky
error that poisons the CUDA context (stop taking jobs; only a new process recovers).

Out of memory arrives in several spellings: `torch.OutOfMemoryError` from the caching allocator, but
also a plain `RuntimeError("CUDA error: out of memory")` from a kernel launch or a library, and
cuBLAS/cuDNN workspace failures (`CUBLAS_STATUS_ALLOC_FAILED`). A sticky error (an illegal memory
access, a device-side assert, a launch failure, an uncorrectable ECC error) leaves every later CUDA
call failing while the process looks alive.
"""

from __future__ import annotations

import gc
from enum import StrEnum

import torch


class DeviceFailure(StrEnum):
    OUT_OF_MEMORY = "out_of_memory"
    #: The CUDA context is poisoned: every later call fails. Only a new process recovers.
    STICKY = "sticky"


#: Substrings of the messages of allocation failures that are not `torch.OutOfMemoryError`.
OUT_OF_MEMORY_MESSAGES = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUFFT_ALLOC_FAILED",
    "cudaErrorMemoryAllocation",
)
#: Substrings of the messages of errors that leave the CUDA context unusable.
STICKY_MESSAGES = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "illegal instruction",
    "misaligned address",
    "uncorrectable ECC error",
    "hardware stack error",
    "CUDA error: unknown error",
    "CUDA error: an illegal",
    "cudaErrorIllegalAddress",
    "cudaErrorLaunchFailure",
    "GPU is lost",
    "CUDA error: launch timeout",
)


def classify(exc: BaseException) -> DeviceFailure | None:
    """What `exc` says about the accelerator: out of memory, sticky, or nothing (None)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return DeviceFailure.OUT_OF_MEMORY
    if not isinstance(exc, RuntimeError):
        return None
    message = str(exc)
    # Sticky first: "an illegal memory access" would not match the OOM list, but an error that
    # mentions both (a failed launch reported after an allocation) must not be treated as recoverable.
    if any(marker in message for marker in STICKY_MESSAGES):
        return DeviceFailure.STICKY
    if any(marker in message for marker in OUT_OF_MEMORY_MESSAGES):
        return DeviceFailure.OUT_OF_MEMORY
    return None


def summary(exc: BaseException) -> str:
    """An error in one line, for logs, readiness info and job errors (no traceback kept): its type and
    first line, and those of its root cause where it wraps one (a compiler's error inside torch's)."""

    def line(error: BaseException) -> str:
        text = str(error).strip()
        return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".strip()

    root, seen = exc, {id(exc)}
    while True:
        # torch's compile errors keep what failed as `inner_exception`, or raise from it.
        inner = getattr(root, "inner_exception", None) or root.__cause__ or root.__context__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        seen.add(id(inner))
        root = inner
    said = line(exc) if root is exc else f"{line(exc)} (caused by {line(root)})"
    return said[:500]


def release_memory(devices: list[str]) -> None:
    """Give the memory of a failed job back: collect reference cycles first (a job's tensors can hang
    on frames and closures), then return the caching allocator's free blocks on `devices`.

    Call it after the exception that failed the job is gone (outside its `except` block): its
    traceback holds the frames, and through them the job's tensors.
    """
    gc.collect()
    if torch.cuda.is_available():
        for device in devices:
            with torch.cuda.device(device):
                torch.cuda.empty_cache()


class DeviceLost(RuntimeError):
    """A sticky device error: this process can run no more jobs (the worker exits to be replaced)."""

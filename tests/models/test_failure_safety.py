"""Failure-safe memory: out of memory (in each of its spellings) and sticky device errors, injected on
the CPU at onload, mid-denoise and at decode, in the operators themselves.

After an out-of-memory error the job fails `out_of_memory`, nothing of it stays alive (no stranded
device copy, no activation), and the next job runs and gives the image a clean engine gives; after a
sticky error the engine says the process is done for (`DeviceLost`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from api_schemas.errors import ModelOutOfMemory
from api_schemas.jobs import JobParameters
from models.engine import Engine
from models.failures import DeviceFailure, DeviceLost, classify
from models.memory.ledger import MemoryLedger
from models.modes import Group, MemoryMode, Stage
from models.placement import HostSwap
from models.settings import EngineSettings
from models.stages import observing

IMAGES = [
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for seed in (1, 2)
]
PARAMS = JobParameters(instruction="make it so", steps=3, seed=7, translate=False)

OUT_OF_MEMORY = {
    "allocator": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "kernel": lambda: RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronous"),
    "cublas": lambda: RuntimeError(
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    ),
}
STICKY = lambda: RuntimeError("CUDA error: an illegal memory access was encountered")  # noqa: E731


class FaultInjector(TorchDispatchMode):
    """Raises `error()` from the `nth` operator matching `op` (any when None) once stage `after` has
    started (`event` "start") or ended ("end"); with no stage, from the start."""

    def __init__(
        self,
        *,
        nth: int,
        error: Callable[[], Exception],
        op: object = None,
        after: Stage | None = None,
        event: str = "start",
    ):
        super().__init__()
        self.after, self.event, self.nth, self.error, self.op = after, event, nth, error, op
        self.armed, self.count, self.fired = after is None, 0, False

    def stage_started(self, stage: Stage) -> None:
        self.armed = self.armed or (stage is self.after and self.event == "start")

    def stage_ended(self, stage: Stage) -> None:
        self.armed = self.armed or (stage is self.after and self.event == "end")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:  # noqa: ANN401
        if self.armed and not self.fired and (self.op is None or func is self.op):
            self.count += 1
            if self.count == self.nth:
                self.fired = True
                raise self.error()
        return func(*args, **(kwargs or {}))


#: Where the failures land: (stage armed, at its start or end, operator counted, nth).
WHERE = {
    # The transformer group's onload in `low`: its third tensor copy fails, after two were made.
    "onload": (Stage.ENCODE_PROMPT, "end", torch.ops.aten._to_copy.default, 3),
    "mid-denoise": (Stage.DENOISE, "start", torch.ops.aten.mm.default, 12),
    "decode": (Stage.DECODE, "start", None, 20),
}


def groups(engine: Engine) -> dict[str, list[torch.nn.Module]]:
    pipeline = engine.pipeline
    return {
        "text_encoders": [pipeline.text_encoder, pipeline.text_encoder_2],
        "transformer": [pipeline.transformer],
    }


@pytest.fixture(scope="module")
def engine(tiny_cache) -> Engine:
    return Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", memory="low", translator=False)
    )


@pytest.fixture(scope="module")
def clean_image(engine) -> np.ndarray:
    return np.asarray(engine.run(IMAGES, PARAMS).image)


def test_the_spellings_of_out_of_memory_and_of_sticky_errors():
    for make in OUT_OF_MEMORY.values():
        assert classify(make()) is DeviceFailure.OUT_OF_MEMORY
    assert classify(STICKY()) is DeviceFailure.STICKY
    assert classify(RuntimeError("CUDA error: device-side assert triggered")) is DeviceFailure.STICKY
    assert classify(RuntimeError("shape mismatch")) is None and classify(ValueError("out of memory")) is None


@pytest.mark.parametrize(
    ("where", "spelling"),
    [("onload", "allocator"), *(("mid-denoise", s) for s in OUT_OF_MEMORY), ("decode", "cublas")],
)
def test_out_of_memory_fails_the_job_frees_it_and_the_next_job_runs(engine, clean_image, where, spelling):
    after, event, op, nth = WHERE[where]
    injector = FaultInjector(after=after, event=event, nth=nth, error=OUT_OF_MEMORY[spelling], op=op)
    with MemoryLedger(groups(engine)) as ledger, observing(injector), injector:
        with pytest.raises(ModelOutOfMemory) as info:
            engine.run(IMAGES, PARAMS)
        assert injector.fired
        left = ledger.boundary("after")
    assert "ran out of memory" in info.value.message and info.value.details["memory_mode"] == "low"
    # Nothing stranded: no group's device copy, no activation of the failed job (the scheduler's
    # schedule of a few bytes aside, kept until the next job replaces it).
    assert left.groups == {}
    assert left.activations <= 1024, left
    assert not any(swap.onloaded for swap in engine.placement.swaps.values())
    assert np.array_equal(np.asarray(engine.run(IMAGES, PARAMS).image), clean_image)


def test_a_sticky_error_says_the_process_is_done(engine, clean_image):
    injector = FaultInjector(after=Stage.DENOISE, nth=5, error=STICKY, op=torch.ops.aten.mm.default)
    with observing(injector), injector, pytest.raises(DeviceLost, match="illegal memory access"):
        engine.run(IMAGES, PARAMS)
    assert not any(swap.onloaded for swap in engine.placement.swaps.values())


def test_a_failed_onload_puts_every_tensor_back_on_its_host_copy():
    model = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(4))).requires_grad_(False)
    swap = HostSwap([model], "cpu")
    hosts = [t.data_ptr() for t in model.parameters()]
    injector = FaultInjector(nth=5, error=OUT_OF_MEMORY["allocator"], op=torch.ops.aten._to_copy.default)
    with injector, pytest.raises(torch.OutOfMemoryError):
        swap.onload()
    assert injector.fired and not swap.onloaded
    assert [t.data_ptr() for t in model.parameters()] == hosts  # all back on the host copies
    with swap.on_device():
        assert all(t.data_ptr() not in hosts for t in model.parameters())
    assert [t.data_ptr() for t in model.parameters()] == hosts
    assert swap.visits == 1


def test_the_groups_a_failed_job_onloaded_are_offloaded_in_every_mode(tiny_cache):
    engine = Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", memory=MemoryMode.BALANCED)
    )
    injector = FaultInjector(
        after=Stage.ENCODE_PROMPT, nth=3, error=OUT_OF_MEMORY["kernel"], op=torch.ops.aten.mm.default
    )
    with observing(injector), injector, pytest.raises(ModelOutOfMemory):
        engine.run(IMAGES, PARAMS)
    assert not engine.placement.swaps[Group.TEXT_ENCODERS].onloaded

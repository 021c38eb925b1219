"""Putting the worker's models where its memory mode says, and moving them for the stages that use them.

`Placement` reads `models.memory.MODES`, the table the planner predicts from, so what is planned is
what runs. Three ways a group of models can use the accelerator:

- resident: moved there once at start;
- swapped (`HostSwap`): weights kept in host memory (packed into a few pinned blocks, so copies run at
  full PCIe speed and the host holds little more than the weights) and copied onto the device for
  the stage that uses them; leaving the stage drops the device copy (weights never change, so
  nothing is copied back);
- streamed: diffusers' group offloading, block by block, on a CUDA stream that prefetches the next
  block while the current one runs.

On a CPU-only machine every device is the CPU: the host blocks are ordinary memory and an onload
still makes its copy, so the same calls make the same allocations in the same order, which the
tests check (`models.memory.ledger`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from models.fp8 import store_in_fp8
from models.modes import GROUP_STAGES, MODES, Group, MemoryMode, Residency, translator_residency
from models.pinned import HostBlocks, module_tensors

if TYPE_CHECKING:
    from models.pipeline import DreamOmni2Pipeline
    from models.translator import InstructionTranslator

logger = logging.getLogger(__name__)


class HostSwap:
    """Modules whose weights live in host memory and visit `device` only inside `on_device()`.

    The host copies are packed into a few blocks (`models.pinned.HostBlocks`, pinned next to a GPU),
    which the planner's `host_bytes` predicts exactly. Onloading makes a device copy of every tensor
    (a real copy on a CPU too, so that the CPU tests see what a GPU holds); offloading points the
    modules back at the host copies and drops the device ones. Both are failure-atomic: an error
    part-way (out of memory at tensor k) puts every tensor back on the host copy before it propagates,
    so no device copy is stranded.
    """

    def __init__(self, modules: list[torch.nn.Module], device: str | torch.device):
        self.device = torch.device(device)
        self.onloaded = False
        #: Every stage this swap served, in order (for logs and tests).
        self.visits = 0
        tensors = module_tensors(*modules)
        for tensor in tensors:
            if tensor.device.type != "cpu":
                tensor.data = tensor.data.to("cpu")
        self.host = HostBlocks(tensors, pin=self.device.type == "cuda", adopt=True)
        self._tensors = list(zip(tensors, self.host.views, strict=True))

    @property
    def nbytes(self) -> int:
        """Host bytes this group holds (its blocks)."""
        return self.host.nbytes

    def onload(self) -> None:
        if self.onloaded:
            return
        done = 0
        try:
            for tensor, host in self._tensors:
                # Layerwise casting swaps `.data` per forward; the host copy holds the stored dtype.
                tensor.data = host.to(self.device, non_blocking=True, copy=True)
                done += 1
        except BaseException:
            for tensor, host in self._tensors[:done]:
                tensor.data = host
            raise
        self.onloaded = True
        self.visits += 1

    def offload(self) -> None:
        if not self.onloaded:
            return
        for tensor, host in self._tensors:
            tensor.data = host
        self.onloaded = False

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        self.onload()
        try:
            yield
        finally:
            self.offload()


class Placement:
    """Where each group of the engine's models lives in one memory mode, and the moves between stages."""

    def __init__(
        self, mode: MemoryMode, device: str | torch.device, translator_device: str | torch.device | None
    ):
        self.mode = MemoryMode(mode)
        self.spec = MODES[self.mode]
        self.device = torch.device(device)
        self.translator_device = torch.device(translator_device) if translator_device is not None else None
        self.swaps: dict[Group, HostSwap] = {}
        self.residency: dict[Group, Residency] = {}
        #: The streamed transformer's host blocks (`stream` mode).
        self.streamed_host: HostBlocks | None = None

    def translator_residency(self) -> Residency:
        """As the mode says when it shares the pipeline's device; resident on a device of its own."""
        if self.translator_device is None:
            return Residency.RESIDENT
        return translator_residency(self.mode, self.device, self.translator_device)

    def place_pipeline(self, pipeline: DreamOmni2Pipeline) -> None:
        """Put the pipeline's models where the mode says; the LoRAs must be loaded already.

        fp8 storage (`models.fp8`, per-row scales) is applied after the LoRAs so that the adapters stay
        in the compute dtype and the base weights they wrap are the ones stored in fp8.
        """
        spec = self.spec
        transformer = pipeline.transformer
        if spec.fp8_transformer:
            store_in_fp8(transformer, transformer.dtype)
        pipeline.vae.to(self.device)
        self._place(Group.TEXT_ENCODERS, spec.text_encoders, [pipeline.text_encoder, pipeline.text_encoder_2])
        if spec.transformer is Residency.STREAMED:
            use_stream = self.device.type == "cuda"
            # Group offloading starts from host memory (the GPU benches build on the device). Its host
            # copies are pinned here in a few blocks: group offloading would pin tensor by tensor
            # (each rounded up to a power of two) but reuses tensors that are pinned already.
            transformer.to("cpu")
            if use_stream:  # on a CPU the streamed blocks compute in place: nothing to pin
                self.streamed_host = HostBlocks(module_tensors(transformer), pin=True, adopt=True)
            transformer.enable_group_offload(
                onload_device=self.device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=use_stream,
                record_stream=use_stream,
            )
            self.residency[Group.TRANSFORMER] = Residency.STREAMED
        else:
            self._place(Group.TRANSFORMER, spec.transformer, [transformer])
        # Components may sit in host memory between stages; the pipeline computes on this device.
        pipeline.compute_device = self.device

    def place_translator(self, translator: InstructionTranslator) -> None:
        self._place(Group.TRANSLATOR, self.translator_residency(), [translator.model], self.translator_device)

    def _place(
        self,
        group: Group,
        residency: Residency,
        modules: list[torch.nn.Module],
        device: torch.device | None = None,
    ) -> None:
        device = device or self.device
        if residency is Residency.SWAPPED:
            self.swaps[group] = HostSwap(modules, device)
        else:
            for module in modules:
                module.to(device)
        self.residency[group] = residency

    @contextlib.contextmanager
    def running(self, group: Group) -> Iterator[None]:
        """The models of `group` on their device for the duration (a no-op when they live there)."""
        swap = self.swaps.get(group)
        if swap is None:
            yield
            return
        with swap.on_device():
            yield

    def describe(self) -> dict[str, Any]:
        """What the worker reports in its readiness info."""
        return {
            "mode": self.mode.value,
            "device": str(self.device),
            "translator_device": str(self.translator_device) if self.translator_device else None,
            "fp8_transformer": self.spec.fp8_transformer,
            "groups": {group.value: residency.value for group, residency in self.residency.items()},
            "swapped_stages": {
                group.value: [stage.value for stage in GROUP_STAGES[group]] for group in self.swaps
            },
            "host_bytes": self.host_bytes(),
        }

    def host_bytes(self) -> dict[str, int]:
        """Host memory held per swapped or streamed group (pinned next to a GPU)."""
        held = {group.value: swap.nbytes for group, swap in self.swaps.items()}
        if self.streamed_host is not None:
            held[Group.TRANSFORMER.value] = self.streamed_host.nbytes
        return held

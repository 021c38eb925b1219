"""The live-memory ledger: what a job really holds, stage by stage, seen on any device (a CPU included).

While active, the ledger sees every operator the job runs (a `TorchDispatchMode`) and records every
tensor storage an operator creates: its bytes and the stage that allocated it (`models.stages`
tells it the stages). A storage leaves the ledger when it is freed. At every stage boundary it
attributes what is alive: storages that hold a model group's weights (a swapped group's device
copies) to that group, everything else to the stage that allocated it. It also tracks the largest
total alive within each stage.

Weights that exist before the ledger starts (resident models, host copies) are not allocations of
the job: pass their bytes as `baseline_bytes` to compare totals with the planner's stage peaks.

This is a diagnosis tool for tests and benches: it slows every operator down (a Python call each).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models.modes import Stage
from models.pinned import module_tensors
from models.stages import observing

#: The stage label of allocations made outside any stage (a group's onload around the pipeline call,
#: image preprocessing).
BETWEEN = "between"


@dataclass(frozen=True)
class Boundary:
    """What was alive when a stage started or ended."""

    stage: str
    event: str  # "start" or "end"
    #: Bytes of live device copies of each group's weights (groups with none are left out).
    groups: dict[str, int]
    #: Bytes alive that hold no group's weights, by the stage that allocated them.
    by_stage: dict[str, int]

    @property
    def activations(self) -> int:
        return sum(self.by_stage.values())


@dataclass
class _Entry:
    nbytes: int
    stage: str


@dataclass
class LedgerReport:
    """A finished run: per-stage peaks of what the job allocated, and the boundaries in order."""

    peaks: dict[str, int] = field(default_factory=dict)
    boundaries: list[Boundary] = field(default_factory=list)
    baseline_bytes: int = 0

    def peak_total(self, stage: Stage | str) -> int:
        """The stage's peak with the pre-existing weights: what a device would have held at most."""
        return self.baseline_bytes + self.peaks.get(Stage(stage).value, 0)

    def at(self, stage: Stage | str, event: str) -> list[Boundary]:
        """Every boundary of `stage` of kind `event` ("start" or "end"), in order."""
        return [b for b in self.boundaries if b.stage == Stage(stage).value and b.event == event]


class MemoryLedger(TorchDispatchMode):
    """Records every storage the code under it allocates; use as a context manager around jobs.

    `groups` names the modules whose weights count as that group's (e.g. the engine's placement
    groups); `baseline_bytes` is what was on the device before (resident weights).
    """

    def __init__(self, groups: dict[str, Sequence[torch.nn.Module]], baseline_bytes: int = 0):
        super().__init__()
        self.groups = {name: list(modules) for name, modules in groups.items()}
        self.report = LedgerReport(baseline_bytes=baseline_bytes)
        self.live = 0
        self._entries: dict[int, _Entry] = {}
        self._stages: list[str] = []
        self._observing: Any = None

    # Stages --------------------------------------------------------------------------------------
    @property
    def stage(self) -> str:
        return self._stages[-1] if self._stages else BETWEEN

    def stage_started(self, stage: Stage) -> None:
        self._stages.append(Stage(stage).value)
        self.report.peaks[self.stage] = max(self.report.peaks.get(self.stage, 0), self.live)
        self.report.boundaries.append(self.boundary("start"))

    def stage_ended(self, stage: Stage) -> None:
        self.report.boundaries.append(self.boundary("end"))
        if self._stages and self._stages[-1] == Stage(stage).value:
            self._stages.pop()

    def boundary(self, event: str) -> Boundary:
        owners = self._owners()
        groups: dict[str, int] = {}
        by_stage: dict[str, int] = {}
        for key, entry in self._entries.items():
            owner = owners.get(key)
            if owner is not None:
                groups[owner] = groups.get(owner, 0) + entry.nbytes
            else:
                by_stage[entry.stage] = by_stage.get(entry.stage, 0) + entry.nbytes
        return Boundary(self.stage, event, groups, by_stage)

    def _owners(self) -> dict[int, str]:
        owners: dict[int, str] = {}
        for name, modules in self.groups.items():
            for tensor in module_tensors(*modules):
                owners[id(tensor.untyped_storage())] = name
        return owners

    # Allocations ---------------------------------------------------------------------------------
    def alive(self, where: Callable[[str], bool] | None = None) -> int:
        """Bytes alive now (that the ledger saw allocated), of the stages `where` accepts."""
        return sum(e.nbytes for e in self._entries.values() if where is None or where(e.stage))

    def _record(self, tensors: Iterable[torch.Tensor], inputs: set[int]) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key = id(storage)
            # Views, in-place results and no-op moves share an input's storage: nothing allocated.
            if key in self._entries or key in inputs or storage.nbytes() == 0 or tensor.device.type == "meta":
                continue
            entry = _Entry(storage.nbytes(), self.stage)
            self._entries[key] = entry
            self.live += entry.nbytes
            weakref.finalize(storage, self._freed, key, entry)
            stage = self.stage
            if self.live > self.report.peaks.get(stage, 0):
                self.report.peaks[stage] = self.live

    def _freed(self, key: int, entry: _Entry) -> None:
        if self._entries.get(key) is entry:
            del self._entries[key]
            self.live -= entry.nbytes

    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:  # noqa: ANN401 (whatever the operator returns)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            id(item.untyped_storage())
            for item in tree_flatten((args, kwargs))[0]
            if isinstance(item, torch.Tensor)
        }
        self._record((item for item in tree_flatten(out)[0] if isinstance(item, torch.Tensor)), inputs)
        return out

    def __enter__(self) -> MemoryLedger:
        self._observing = observing(self)
        self._observing.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._observing.__exit__(*exc)
        self._observing = None

"""The stages of a job as the engine and the pipeline run them, announced to whoever observes them.

The engine marks translate and encode_prompt, the pipeline encode_images, denoise and decode: the
stages the memory planner predicts (`models.modes.Stage`). Observers are for diagnosis and tests (the
live-memory ledger `models.memory.ledger`, fault injection); with none registered a mark costs one
empty loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from models.modes import Stage


class StageObserver(Protocol):
    def stage_started(self, stage: Stage) -> None: ...

    def stage_ended(self, stage: Stage) -> None: ...


_observers: list[StageObserver] = []


@contextlib.contextmanager
def stage(which: Stage) -> Iterator[None]:
    """Run the block as stage `which`: observers hear when it starts and when it ends (even by an
    exception)."""
    for observer in tuple(_observers):
        observer.stage_started(which)
    try:
        yield
    finally:
        for observer in reversed(tuple(_observers)):
            observer.stage_ended(which)


@contextlib.contextmanager
def observing(observer: StageObserver) -> Iterator[StageObserver]:
    """`observer` hears every stage started and ended inside the block."""
    _observers.append(observer)
    try:
        yield observer
    finally:
        _observers.remove(observer)

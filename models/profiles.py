"""The speed profiles' names (`DREAMOMNI2_SPEED`), free of torch so that settings can name them."""

from __future__ import annotations

from enum import StrEnum


class SpeedProfile(StrEnum):
    """`reference` (eager, the baseline), `compiled` (lossless), `fp8` (compiled + fp8 linears)."""

    REFERENCE = "reference"
    COMPILED = "compiled"
    FP8 = "fp8"

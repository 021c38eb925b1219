"""Memory modes on the tiny preset: job time against `resident`, and how far each mode's image is from it.

    python bench/memory_modes.py [--repeats 5] [--steps 8]

For each mode and each adapter (base, edit LoRA, generation LoRA), the same jobs with the same seeds:
  * time: median `Engine.run` seconds and the ratio to `resident` measured in this run. On a CPU the
    host and the device are one memory, so this is the cost of the placement's bookkeeping (and of
    fp8 casting in `low`), not of PCIe copies; `bench/gpu_suite.py` measures those on a GPU;
  * difference from `resident` in 8-bit pixel levels (mean and max): 0 for the exact modes, the fp8
    storage error for `low`, printed beside the difference between two adapters for scale.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

from api_schemas.common import Task
from api_schemas.jobs import JobParameters
from models.engine import Engine
from models.modes import MemoryMode
from models.settings import EngineSettings
from models.tiny import ensure_tiny


def noise_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="dreamomni2-modes-bench-"))
    ensure_tiny(cache)

    images = [noise_image(64, 64, 1), noise_image(64, 64, 2)]
    jobs = {
        "base": (images[:1], Task.EDIT),
        "edit": (images, Task.EDIT),
        "generation": (images, Task.GENERATE),
    }
    outputs: dict[tuple[str, str], np.ndarray] = {}
    seconds: dict[str, float] = {}
    for mode in MemoryMode:
        engine = Engine.from_settings(
            EngineSettings(preset="tiny", cache_dir=cache, device="cpu", memory=mode, translator=False)
        )
        times = []
        for repeat in range(args.repeats + 1):
            started = time.perf_counter()
            for name, (inputs, task) in jobs.items():
                params = JobParameters(
                    instruction="make it so", task=task, steps=args.steps, seed=3, translate=False
                )
                outputs[(mode.value, name)] = np.asarray(engine.run(inputs, params).image).astype(np.float64)
            if repeat:  # the first round warms up
                times.append(time.perf_counter() - started)
        seconds[mode.value] = statistics.median(times)

    resident = MemoryMode.RESIDENT.value
    adapters = np.abs(outputs[(resident, "edit")] - outputs[(resident, "generation")])
    print(
        f"tiny preset, CPU, {args.steps} steps, 3 jobs per round (base, edit, generation), "
        f"median of {args.repeats}"
    )
    print(
        f"edit vs generation LoRA in resident (for scale): mean {adapters.mean():.2f}, "
        f"max {adapters.max():.0f} levels"
    )
    print(f"{'mode':<10} {'s/round':>8} {'ratio':>6}  " + "  ".join(f"{n + ' mean/max':>18}" for n in jobs))
    for mode in MemoryMode:
        diffs = []
        for name in jobs:
            diff = np.abs(outputs[(mode.value, name)] - outputs[(resident, name)])
            diffs.append(f"{diff.mean():>12.3f} / {diff.max():>3.0f}")
        ratio = seconds[mode.value] / seconds[resident]
        print(f"{mode.value:<10} {seconds[mode.value]:>8.3f} {ratio:>6.2f}  " + "  ".join(diffs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

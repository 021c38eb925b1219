"""Registered LoRAs: the cost of a switch, and a job with two stacked LoRAs against one with none.

Runs on the tiny weights (CPU) or any preset the environment names, both measured in the same run on
the same engine, and prints ratios. `python bench/lora_bench.py [--speed compiled] [--jobs 5]`.
Under a compiled profile it also counts the graphs dynamo compiles after warm-up while the timed jobs
switch LoRAs, scales and ranks (the LoRAs fold into the weights, so the promise is 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from api_schemas.common import Task
from api_schemas.jobs import JobParameters
from models.engine import Engine
from models.settings import EngineSettings
from models.tiny_loras import save_tiny_lora


def main(argv: list[str] | None = None) -> None:
    """Measure and print the switch cost and the stacked-LoRA job ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", default="reference", help="DREAMOMNI2_SPEED (reference, compiled)")
    parser.add_argument("--jobs", type=int, default=5, help="timed jobs of each kind")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    registry = {
        "a": {"path": str(save_tiny_lora(folder / "a.safetensors", "peft", seed=1, rank=4))},
        "b": {"path": str(save_tiny_lora(folder / "b.safetensors", "kohya", seed=2, rank=8))},
    }
    settings = EngineSettings(
        preset="tiny",
        device="cpu",
        translator=False,
        speed=args.speed,
        limits={"loras": json.dumps(registry)},
    )
    engine = Engine.from_settings(settings)
    images = [PIL.Image.fromarray(np.full((64, 64, 3), 100 + 40 * n, dtype=np.uint8)) for n in range(2)]

    def job(loras: list | None) -> float:
        params = JobParameters(
            instruction="x", task=Task.EDIT, steps=args.steps, seed=1, translate=False, loras=loras
        )
        started = time.perf_counter()
        engine.run(images, params)
        return time.perf_counter() - started

    stacked = [{"name": "a"}, {"name": "b", "scale": 0.7}]
    for loras in (None, stacked):  # warm
        job(loras)
    graphs = _compiled_graphs()
    none_s, stacked_s = [], []
    # Between them, other ranks and scales (rank 8 alone, rank 4 at -0.5): switches a recompile would show.
    others = ([{"name": "b", "scale": 1.3}], [{"name": "a", "scale": -0.5}])
    for n in range(args.jobs):  # interleaved, so both see the same machine
        none_s.append(job(None))
        stacked_s.append(job(stacked))
        job(others[n % 2])
    recompiles = _compiled_graphs() - graphs
    adapters = engine.adapters
    switch_s = []
    for n in range(args.jobs * 4):
        loras = engine.check(JobParameters(instruction="x", loras=stacked if n % 2 else None), 2).loras
        started = time.perf_counter()
        adapters.activate(adapters.active, loras)
        switch_s.append(time.perf_counter() - started)
    none, both, switch = (statistics.median(x) for x in (none_s, stacked_s, switch_s))
    print(f"speed profile: {engine.profile.serving}, {args.steps} steps, median of {args.jobs}")
    print(f"job without LoRA:      {none * 1000:8.1f} ms")
    print(f"job with two LoRAs:    {both * 1000:8.1f} ms   ratio {both / none:.3f}x")
    print(f"LoRA switch (activate): {switch * 1000:7.2f} ms   {switch / none:.3%} of a job")
    if engine.profile.serving != "reference":
        print(f"graphs compiled after warm-up over {3 * args.jobs} jobs switching LoRAs: {recompiles}")


def _compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


if __name__ == "__main__":
    main()

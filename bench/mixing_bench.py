"""A Feature Mixing pair against two ordinary generations of its prompts, measured in one run.

    python bench/mixing_bench.py                          # tiny preset on the CPU
    python bench/mixing_bench.py --repeats 5 --steps 12
    python bench/mixing_bench.py --shapes full --size 1024 --steps 30   # full-size random weights, CUDA

Through `Engine.run`, as a worker runs them, same seed, interleaved in each repeat:
  * a `feature_mixing` job (every block, every step, strength 1) in the engine's exact two-pass form,
    and the same job in the batch-2 form (`Engine.mixing_batched`);
  * the two `generate` jobs of its source and target prompts (translation off), back to back.
Prints median job and denoise times, their ratio to the two ordinary jobs, transformer calls, and
how far each pair's source is from the ordinary source in 8-bit levels (0: bit-identical). The tiny
models say little about full-size speed (a 2-core CPU, models a few MB): they show the mechanics.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from api_schemas.common import Task
from api_schemas.jobs import JobParameters
from models.engine import Engine, JobOutput
from models.settings import EngineSettings
from models.tiny import ensure_tiny

sys.path.insert(0, str(Path(__file__).resolve().parent))

SOURCE = "a glass teapot on a wooden table"
TARGET = "a cat sitting on a wooden table"


def build_engine(args: argparse.Namespace, cache: Path, device: str) -> Engine:
    """The tiny preset as a worker loads it, or the full-size architectures with random weights."""
    if args.shapes == "tiny":
        settings = EngineSettings(preset="tiny", cache_dir=cache, device=device, translator=False)
        return Engine.from_settings(settings)
    from gpu_baseline import add_random_loras, build_full

    from models.memory import ASSUMED_LORA_RANK
    from models.placement import Placement

    pipeline, _ = build_full(device, torch.bfloat16, cache)
    adapters = add_random_loras(pipeline, ASSUMED_LORA_RANK)
    settings = EngineSettings(
        preset="dreamomni2", cache_dir=cache, device=device, translator=False,
        max_area=args.size**2, bucket_scale=args.size / 1024, memory_check=False,
    )  # fmt: skip
    return Engine.assemble(settings, pipeline, adapters, None, Placement(settings.memory, device, None))


def timed_run(engine: Engine, params: JobParameters) -> tuple[JobOutput, float]:
    started = time.perf_counter()
    output = engine.run([], params)
    return output, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--size", type=int, default=1024, help="full shapes: output side in pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, default=None, help="models cache (default: a temp dir)")
    args = parser.parse_args()
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="dreamomni2-mixing-bench-"))
    ensure_tiny(cache)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shapes == "full" and device != "cuda":
        print("--shapes full needs a CUDA device", file=sys.stderr)
        return 2
    engine = build_engine(args, cache, device)
    common = dict(steps=args.steps, seed=5)
    pair = JobParameters(task=Task.FEATURE_MIXING, source_prompt=SOURCE, target_prompt=TARGET, **common)
    ordinary = [
        JobParameters(instruction=prompt, task=Task.GENERATE, translate=False, **common)
        for prompt in (SOURCE, TARGET)
    ]

    rows: dict[str, dict[str, list[float]]] = {}
    sources: dict[str, np.ndarray] = {}
    calls: dict[str, int] = {}

    def record(name: str, outputs: list[JobOutput], seconds: float) -> None:
        row = rows.setdefault(name, {"job": [], "denoise": []})
        row["job"].append(seconds)
        row["denoise"].append(sum(o.metadata.timings["denoise"] for o in outputs))
        sources[name] = np.asarray(outputs[0].images[0]).astype(np.float64)
        calls[name] = sum(o.metadata.transformer_evaluations or 0 for o in outputs)

    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        results = {}
        started = time.perf_counter()
        first, second = (engine.run([], p) for p in ordinary)
        results["2 x ordinary"] = ([first, second], time.perf_counter() - started)
        for name, batched in (("pair, two passes", False), ("pair, batch 2", True)):
            engine.mixing_batched = batched
            output, seconds = timed_run(engine, pair)
            results[name] = ([output], seconds)
        engine.mixing_batched = False
        if repeat:
            for name, (outputs, seconds) in results.items():
                record(name, outputs, seconds)

    base = rows["2 x ordinary"]
    base_job, base_denoise = statistics.median(base["job"]), statistics.median(base["denoise"])
    print(
        f"{args.shapes} shapes on {device}, {args.steps} steps, median of {args.repeats}; "
        "ratio: this row's time over two ordinary generations'"
    )
    print(
        f"{'':<18} {'job s':>8} {'ratio':>6} {'denoise s':>10} {'ratio':>6} {'calls':>6} "
        f"{'source diff max':>16}"
    )
    for name, row in rows.items():
        job, denoise = statistics.median(row["job"]), statistics.median(row["denoise"])
        diff = np.abs(sources[name] - sources["2 x ordinary"]).max()
        print(
            f"{name:<18} {job:>8.3f} {job / base_job:>6.2f} {denoise:>10.4f} {denoise / base_denoise:>6.2f} "
            f"{calls[name]:>6} {diff:>16.0f}"
        )
    pair_job = statistics.median(rows["pair, two passes"]["job"])
    print(f"Feature Mixing pair / two ordinary generations: {pair_job / base_job:.2f} (job time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

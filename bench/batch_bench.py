"""Several images per job, one after another against one batch, measured in one run.

    python bench/batch_bench.py [--repeats 5] [--steps 8] [--num-images 4]

1. The tiny preset through `Engine.run`, as a worker runs a job (a 2-image edit at the tiny
   preset's largest bucket, translator off): `--num-images` images sampled one after another
   (DREAMOMNI2_BATCH_IMAGES=1) against all of them as one batch, interleaved in each repeat. Prints
   the fastest and median job time of each, their ratio, and how far each batched image is from the
   one-image job with its seed (8-bit levels).
2. The planner's GPU peak for the same job at 1024x1024 with the published models (`resident`,
   bf16): what sampling the images together costs in memory.
"""

from __future__ import annotations

import argparse
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
from models.memory import GiB, plan_memory, published_sizes
from models.settings import EngineSettings

#: Two inputs at the tiny preset's largest bucket (1024x1024 / 16).
IMAGES = [
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for seed in (1, 2)
]


def tiny_jobs(args: argparse.Namespace, cache: Path) -> None:
    engines = {
        batch: Engine.from_settings(
            EngineSettings(preset="tiny", cache_dir=cache, device="cpu", translator=False, batch_images=batch)
        )
        for batch in (1, args.num_images)
    }
    job = JobParameters(
        instruction="x", task=Task.EDIT, steps=args.steps, seed=1, translate=False, num_images=args.num_images
    )
    seconds: dict[int, list[float]] = {batch: [] for batch in engines}
    outputs: dict[int, list[np.ndarray]] = {}
    for engine in engines.values():
        engine.run(IMAGES, job)  # warm-up
    for _ in range(args.repeats):
        for batch, engine in engines.items():
            started = time.perf_counter()
            output = engine.run(IMAGES, job)
            seconds[batch].append(time.perf_counter() - started)
            outputs[batch] = [np.asarray(image).astype(int) for image in output.images]
    threads = torch.get_num_threads()
    print(
        f"tiny preset, a 2-image edit at 64x64, {args.num_images} images of {args.steps} steps, "
        f"{args.repeats} repeats (CPU, {threads} threads)"
    )
    one, all_ = 1, args.num_images
    for name, pick in (("fastest", min), ("median", statistics.median)):
        apart, together = pick(seconds[one]), pick(seconds[all_])
        print(
            f"  {name}: one after another {apart * 1e3:.1f} ms, as one batch {together * 1e3:.1f} ms: "
            f"batch / sequential = {together / apart:.2f}"
        )
    levels = [int(np.abs(a - b).max()) for a, b in zip(outputs[one], outputs[all_], strict=True)]
    print(f"  batched image vs the one-image job with its seed, most 8-bit levels apart: {levels}")


def planned_peaks(args: argparse.Namespace) -> None:
    sizes = published_sizes()
    print("planned GPU peak of the same job at 1024x1024, published models, DREAMOMNI2_MEMORY=resident:")
    base = None
    for batch in (1, args.num_images):
        plan = plan_memory("resident", 2, sizes=sizes, batch=batch)
        base = base or plan.peak_bytes
        denoise = plan.activations["denoise"] / GiB
        print(
            f"  batch {batch}: {plan.peak_bytes / GiB:.2f} GiB (during {plan.peak_stage}; denoise "
            f"activations {denoise:.2f} GiB), {plan.peak_bytes / base:.3f} x batch 1"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--cache-dir", type=Path, help="tiny preset cache (default: a temp dir)")
    args = parser.parse_args()
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="dreamomni2-bench-"))
    tiny_jobs(args, cache)
    planned_peaks(args)


if __name__ == "__main__":
    main()

"""Tiny-preset job time against a direct diffusers `FluxKontextPipeline` call on the same weights.

    python bench/engine_bench.py [--repeats 7] [--steps 8]

Prints medians and ratios measured in this run:
  * by number of input images (0 to 5): `Engine.run` (translator off, so both sides do the same kind of
    work) against stock Kontext with the one conditioning image it supports (none for 0 images);
    the translator's own time is printed beside it;
  * by output size (text-to-image): `Engine.run` against stock Kontext at the same size.
The tiny models say nothing about full-size speed; this measures the overhead of our code path.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import FluxKontextPipeline

from api_schemas.common import Task
from api_schemas.jobs import JobParameters
from models.buckets import nearest_bucket
from models.engine import Engine
from models.settings import EngineSettings
from models.tiny import ensure_tiny


def noise_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def median_seconds(repeats: int, fn: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    fn(*args, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="tiny preset cache (default: a temp dir)"
    )
    args = parser.parse_args()

    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="dreamomni2-bench-"))
    engine = Engine.from_settings(EngineSettings(preset="tiny", cache_dir=cache, device="cpu"))
    stock = FluxKontextPipeline.from_pretrained(ensure_tiny(cache) / "kontext")
    stock.set_progress_bar_config(disable=True)
    images = [noise_image(96 + 16 * n, 64, n) for n in range(5)]

    def stock_call(image: PIL.Image.Image | None, width: int, height: int, max_area: int) -> None:
        if image is not None:
            # The same bucket the engine picks, so both sides sample the same number of tokens.
            image = image.resize(nearest_bucket(*image.size, engine.buckets), PIL.Image.LANCZOS)
        stock(
            image=image,
            prompt="a red bag",
            height=height,
            width=width,
            num_inference_steps=args.steps,
            max_area=max_area,
            _auto_resize=False,
            generator=torch.Generator().manual_seed(0),
        )

    def params(task: Task, translate: bool = False, **kwargs: Any) -> JobParameters:
        return JobParameters(
            instruction="a red bag", task=task, steps=args.steps, seed=0, translate=translate, **kwargs
        )

    print(f"tiny preset, CPU, {args.steps} steps, median of {args.repeats} runs, torch {torch.__version__}")
    print("\nby number of input images (baseline: stock Kontext with min(n, 1) image)")
    print(f"{'images':>6} {'engine s':>9} {'stock s':>9} {'ratio':>6} {'translator s':>13}")
    for count in range(6):
        task = Task.EDIT if count else Task.GENERATE
        job_images = images[:count]
        out = engine.run(job_images, params(task)).image
        ours = median_seconds(args.repeats, engine.run, job_images, params(task))
        first = job_images[0] if job_images else None
        base = median_seconds(args.repeats, stock_call, first, out.width, out.height, engine.max_area)
        translated = engine.run(job_images, params(task, translate=True)).metadata.timings["translate"]
        print(f"{count:>6} {ours:>9.4f} {base:>9.4f} {ours / base:>6.2f} {translated:>13.4f}")

    print("\nby output size, text-to-image (baseline: stock Kontext at the same size)")
    print(f"{'size':>9} {'engine s':>9} {'stock s':>9} {'ratio':>6}")
    for side in (64, 128, 256):
        engine.max_area = side * side
        ours = median_seconds(args.repeats, engine.run, [], params(Task.GENERATE, width=1024, height=1024))
        base = median_seconds(args.repeats, stock_call, None, side, side, side * side)
        print(f"{side}x{side:<5} {ours:>9.4f} {base:>9.4f} {ours / base:>6.2f}")


if __name__ == "__main__":
    main()

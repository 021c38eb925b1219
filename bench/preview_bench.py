"""What live previews cost per denoising step, measured in one run.

    python bench/preview_bench.py [--repeats 7] [--steps 20]

1. The tiny preset through `Engine.run`, as a worker runs a job (a 64x64 generation, translator off):
   previews off against a preview on every step (`preview_every=1`), interleaved in each repeat.
   Prints the fastest and the median denoise time per step of each (on a shared machine the fastest
   is the one other processes disturbed least), the preview's cost per step and its ratio to the
   step, and whether the images are bit-identical.
2. One preview alone at the shapes of a 1024x1024 job (packed latents and velocity (1, 4096, 64),
   float32), on CUDA when visible, else on this CPU: the estimate ``x - sigma * v``, the unpacking,
   the projection to RGB, the copy to the host and the JPEG data URI; its parts and its size. Random
   latents compress worst: the size is an upper bound for a real picture of that size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from api_schemas.common import Task
from api_schemas.jobs import JobParameters
from models.engine import Engine
from models.pipeline import DreamOmni2Pipeline
from models.preview import encode_preview, preview_image
from models.settings import EngineSettings

#: A 1024x1024 output: 128x128 latents, packed 2x2 into 64x64 tokens of 64 channels.
FULL_SIZE = 1024
FULL_TOKENS = (FULL_SIZE // 16) ** 2


def median_ms(repeats: int, fn: Callable[[], object], sync: Callable[[], None]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def tiny_jobs(args: argparse.Namespace, cache: Path) -> None:
    engine = Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=cache, device="cpu", translator=False)
    )
    job = JobParameters(instruction="a red bag", task=Task.GENERATE, steps=args.steps, seed=1)
    previews: list[int] = []

    def on_progress(stage: str, step: int, total: int, *, preview: str | None = None) -> None:
        if preview is not None:
            previews.append(len(preview))

    per_step: dict[int, list[float]] = {0: [], 1: []}
    images: dict[int, np.ndarray] = {}
    engine.run([], job, on_progress=on_progress, preview_every=1)  # warm-up
    for _ in range(args.repeats):
        for every in (0, 1):
            output = engine.run([], job, on_progress=on_progress, preview_every=every)
            per_step[every].append(output.metadata.timings["denoise"] / args.steps * 1e3)
            images[every] = np.asarray(output.image)
    threads = torch.get_num_threads()
    print(f"tiny preset, 64x64, {args.steps} steps, {args.repeats} repeats (CPU, {threads} threads)")
    for name, pick in (("fastest", min), ("median", statistics.median)):
        off, on = pick(per_step[0]), pick(per_step[1])
        print(
            f"  {name}: denoise per step {off:.3f} ms, with a preview each step {on:.3f} ms: "
            f"a preview costs {on - off:.3f} ms = {(on - off) / off:.1%} of a step"
        )
    print(f"  preview data URI: {statistics.median(previews):.0f} characters (8x8 pixels)")
    print(f"  images bit-identical with and without previews: {np.array_equal(images[0], images[1])}")


@torch.no_grad()
def full_size_preview(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, FULL_TOKENS, 64, generator=generator).to(device)
    velocity = torch.randn(1, FULL_TOKENS, 64, generator=generator).to(device)
    sigma = 0.5

    def estimate() -> torch.Tensor:
        return DreamOmni2Pipeline._unpack_latents(latents - sigma * velocity, FULL_SIZE, FULL_SIZE, 8)

    unpacked = estimate()
    image = preview_image(unpacked)
    repeats = args.repeats * 5
    parts = {
        "estimate and unpack": median_ms(repeats, estimate, sync),
        "projection, copy to host, picture": median_ms(repeats, lambda: preview_image(unpacked), sync),
        "JPEG data URI": median_ms(repeats, lambda: encode_preview(image), sync),
    }
    total = median_ms(repeats, lambda: encode_preview(preview_image(estimate())), sync)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    print(f"one preview at 1024x1024 shapes (packed (1, {FULL_TOKENS}, 64), float32) on {name}:")
    for part, ms in parts.items():
        print(f"  {part:36s} {ms:7.3f} ms")
    print(f"  {'all of it':36s} {total:7.3f} ms")
    uri = encode_preview(image)
    size = f"{image.width}x{image.height}"
    print(f"  picture {size}, data URI {len(uri)} characters (random latents: an upper bound)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, help="tiny preset cache (default: a temp dir)")
    args = parser.parse_args()
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="dreamomni2-bench-"))
    tiny_jobs(args, cache)
    full_size_preview(args)


if __name__ == "__main__":
    main()

"""Speed profiles and step caches against `reference`, measured in one run.

    python bench/speed_bench.py                       # tiny preset on the CPU
    python bench/speed_bench.py --repeats 5 --steps 12 --images 2
    python bench/speed_bench.py --shapes full --size 1024 --steps 30   # full-size random weights, CUDA

For each speed profile this machine can run (`reference`, `compiled`, `fp8` on fp8 GPUs) and each
step cache (`none`, `first_block`, `taylorseer`), the same job (an edit with `--images` inputs, the
edit LoRA active) and seed:
  * ready time: building the engine plus its warm-up (the compile, for the compiled profiles), and
    the same again as a restarted worker sees it: torch's in-process state reset, its compile
    caches on disk (`DREAMOMNI2_COMPILE_CACHE_DIR`) kept;
  * per-job and per-step time (medians after a warm-up run) and their ratios to reference/none;
  * transformer evaluations per job (a step cache skips some);
  * the output's difference from reference/none in 8-bit levels (mean, max).
The tiny models say little about full-size speed (a 2-core CPU, models a few MB); they show the
mechanics, the exactness and the evaluation counts. `--shapes full` builds the full-size
architectures with random weights (`bench/gpu_baseline.py`'s builder) once per profile, on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from api_schemas.common import StepCache, Task
from api_schemas.jobs import JobParameters
from models.engine import Engine
from models.profiles import SpeedProfile
from models.settings import EngineSettings
from models.speed import fp8_supported
from models.tiny import ensure_tiny

sys.path.insert(0, str(Path(__file__).resolve().parent))


def noise_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def build_engine(args: argparse.Namespace, cache: Path, device: str, profile: SpeedProfile) -> Engine:
    """A warmed-up engine in `profile`: the tiny preset as a worker loads it, or full-size random weights."""
    if args.shapes == "tiny":
        settings = EngineSettings(
            preset="tiny", cache_dir=cache, device=device, translator=False, speed=profile
        )
        return Engine.from_settings(settings)
    from gpu_baseline import add_random_loras, build_full

    from models.memory import ASSUMED_LORA_RANK
    from models.placement import Placement

    pipeline, _ = build_full(device, torch.bfloat16, cache)
    adapters = add_random_loras(pipeline, ASSUMED_LORA_RANK)
    settings = EngineSettings(
        preset="dreamomni2", cache_dir=cache, device=device, translator=False, speed=profile,
        max_area=args.size**2, bucket_scale=args.size / 1024, memory_check=False,
    )  # fmt: skip
    engine = Engine.assemble(settings, pipeline, adapters, None, Placement(settings.memory, device, None))
    engine.warm_up()
    return engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--size", type=int, default=1024, help="full shapes: side of inputs and output")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--images", type=int, default=2, help="input images of the edit (2: a LoRA runs)")
    parser.add_argument(
        "--profiles", nargs="+", choices=[p.value for p in SpeedProfile],
        help="profiles to compare (reference, the baseline, always runs)",
    )  # fmt: skip
    parser.add_argument("--no-restart", action="store_true", help="skip the restarted-worker ready time")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="models cache; its torch-compile/ is the compile cache"
    )
    args = parser.parse_args()
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="dreamomni2-speed-bench-"))
    ensure_tiny(cache)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shapes == "full" and device != "cuda":
        print("--shapes full needs a CUDA device", file=sys.stderr)
        return 2
    profiles = [SpeedProfile.REFERENCE, SpeedProfile.COMPILED]
    if fp8_supported(torch.device(device)):
        profiles.append(SpeedProfile.FP8)
    if args.profiles:
        # The baseline always runs: every ratio and difference is against it.
        profiles = [SpeedProfile.REFERENCE, *(SpeedProfile(p) for p in args.profiles if p != "reference")]
    side = args.size if args.shapes == "full" else 64
    images = [noise_image(side + 16 * (n % 2), side, n) for n in range(args.images)]
    params = {
        policy: JobParameters(
            instruction="x", task=Task.EDIT, steps=args.steps, seed=5, translate=False, step_cache=policy
        )
        for policy in StepCache
    }

    rows = []
    for profile in profiles:
        started = time.perf_counter()
        engine = build_engine(args, cache, device, profile)
        ready_s = time.perf_counter() - started
        for step_cache in StepCache:
            engine.run(images, params[step_cache])  # warm-up of this combination
            jobs, steps, outputs = [], [], None
            for _ in range(args.repeats):
                result = engine.run(images, params[step_cache])
                jobs.append(result.metadata.timings["total"])
                steps.append(result.metadata.timings["denoise"] / args.steps)
                outputs = np.asarray(result.image).astype(np.float64)
                evaluations = result.metadata.transformer_evaluations
            rows.append({"profile": profile.value, "cache": step_cache.value, "ready_s": ready_s,
                         "job_s": statistics.median(jobs), "step_s": statistics.median(steps),
                         "evaluations": evaluations, "image": outputs})  # fmt: skip
        del engine
        if profile is not SpeedProfile.REFERENCE and not args.no_restart:
            torch._dynamo.reset()  # what a new process lacks; the compile caches on disk stay
            started = time.perf_counter()
            build_engine(args, cache, device, profile)
            restart_s = time.perf_counter() - started
            for row in rows:
                if row["profile"] == profile.value:
                    row["restart_s"] = restart_s

    base = next(r for r in rows if r["profile"] == "reference" and r["cache"] == "none")
    print(f"{args.shapes} shapes on {device}, {args.images}-image edit (edit LoRA), {args.steps} steps, "
          f"median of {args.repeats}; ratios: reference/none time over this row's")  # fmt: skip
    print(
        f"{'profile':<10} {'cache':<12} {'ready s':>8} {'restart':>8} {'job s':>8} {'x job':>6} "
        f"{'step s':>8} {'x step':>6} {'evals':>6} {'diff mean':>10} {'diff max':>8}"
    )
    for r in rows:
        diff = np.abs(r["image"] - base["image"])
        restart = f"{r['restart_s']:>8.1f}" if "restart_s" in r else f"{'-':>8}"
        print(
            f"{r['profile']:<10} {r['cache']:<12} {r['ready_s']:>8.1f} {restart} {r['job_s']:>8.3f} "
            f"{base['job_s'] / r['job_s']:>6.2f} {r['step_s']:>8.4f} {base['step_s'] / r['step_s']:>6.2f} "
            f"{r['evaluations']:>6} {diff.mean():>10.3f} {diff.max():>8.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

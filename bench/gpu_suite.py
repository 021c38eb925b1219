"""The GPU suite: one self-budgeted run on one H100/H200 (about 8 minutes), every figure in one JSON file.

    python bench/gpu_suite.py --out $OUT/suite.json              # on the GPU host
    python bench/gpu_suite.py --shapes tiny --out /tmp/suite.json  # the same sections, tiny, on a CPU

On a GPU host that has torch but none of our other dependencies and no network: here,
`bench/gpu_wheels.sh` downloads the wheels into `.whl/` (diffusers, transformers, peft, the pydantic
stack, torchao); carry `.whl` and run, in the repository root there:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \\
        PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py --out $OUT/suite.json

Sections, in order; each checks the time left first, appends its results to the JSON file as it
ends (a later failure loses nothing), and the summary table is printed last:
  1. matmul: measured bf16 and fp8 (`torch._scaled_mm`) matrix-product ceilings, TFLOP/s;
  2. build: the full-size random-weight architectures (two LoRAs with non-zero B, so a dropped LoRA
     shows), bf16, everything resident: load (build and place) seconds;
  3. reference_jobs: the eager reference configuration, 1 and 2 input images at 1024², the edit LoRA
     active even for 1-image edits (as the reference scripts run), the translator held to a fixed
     token count (`--tokens`): job, translation and step seconds;
  4. cache_step: the cost of a step TaylorSeer predicts against a full one;
  5. profiles: for `reference`, `compiled` and (fp8 GPUs) `fp8`, in that order on the same models:
     the transformer's per-step time and achieved TFLOP/s at 8.7k and 12.8k tokens (1 and 2 input
     images at 1024²) with its relative error against eager; the 2-image edit as a whole job with
     each step cache and its transformer evaluations; the compile time cold (a fresh compile cache)
     and warm (torch's in-process state reset, its caches on disk kept: a restarted worker);
  6. memory_modes: each mode's peaks in its own process, capped at its card size
     (bench/gpu_baseline.py), beside the planner's prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_baseline import noise_image  # noqa: E402 (the bench folder on the path first)

#: The card each memory mode is documented for, in GiB: the cap it runs under in section 6.
CARDS_GIB = {"resident": 80, "balanced": 48, "low": 24, "stream": 24}


class Suite:
    """The time budget, and the results file every section appends to."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.started, self.budget_s = out, time.perf_counter(), budget_s
        self.results: dict[str, Any] = {}
        out.parent.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def record(self, section: str, value: Any) -> None:  # noqa: ANN401 (JSON data)
        self.results[section] = value
        self.out.write_text(json.dumps(self.results, indent=2, default=str))

    def run(self, section: str, needs_s: float, fn: Callable[[], Any]) -> Any:  # noqa: ANN401
        if self.left() < needs_s:
            print(f"== {section}: skipped, {self.left():.0f}s left of the budget (needs ~{needs_s:.0f}s)")
            self.record(section, {"skipped": f"{self.left():.0f}s left"})
            return None
        print(f"== {section} ({self.left():.0f}s left)", flush=True)
        started = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # a finding to report, not a reason to lose the other sections
            print(f"   failed: {type(exc).__name__}: {exc}")
            value = {"error": f"{type(exc).__name__}: {exc}"}
        if isinstance(value, dict):
            value["seconds"] = round(time.perf_counter() - started, 1)
        self.record(section, value)
        return value


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` calls after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def matmul_ceilings(device: torch.device) -> dict[str, Any]:
    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = timed(lambda: a @ b, device, 10)
    found = {"n": n, "dtype": str(dtype), "tflops": 2 * n**3 / seconds / 1e12}
    from models.speed import fp8_supported

    if fp8_supported(device):
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=device)
        seconds, _ = timed(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), device, 10)
        found["fp8_tflops"] = 2 * n**3 / seconds / 1e12
    print(
        f"   {dtype} {found['tflops']:.1f} TFLOP/s"
        + (f", fp8 {found['fp8_tflops']:.1f}" if "fp8_tflops" in found else "")
    )
    return found


class Models:
    """The models the sections share (built once; the profile section changes them last)."""

    def __init__(self, full: bool, device: torch.device, size: int, tokens: int):
        from gpu_baseline import add_random_loras, build_full, build_tiny_shapes

        from models.engine import Engine
        from models.memory import ASSUMED_LORA_RANK
        from models.placement import Placement
        from models.settings import EngineSettings
        from models.tiny import ensure_tiny

        started = time.perf_counter()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tiny_root = ensure_tiny(Path(tempfile.mkdtemp(prefix="dreamomni2-suite-")))
        pipeline, translator = (
            build_full(str(device), dtype, tiny_root) if full else build_tiny_shapes(tiny_root)
        )
        self.adapters = add_random_loras(pipeline, ASSUMED_LORA_RANK if full else 4)
        translator.max_new_tokens = tokens
        settings = EngineSettings(
            preset="dreamomni2" if full else "tiny", device=str(device), max_area=size * size,
            bucket_scale=size / 1024 if full else None, memory_check=False,
        )  # fmt: skip
        placement = Placement(settings.memory, str(device), str(device))
        self.engine = Engine.assemble(settings, pipeline, self.adapters, translator, placement)
        sync(device)
        self.build_s = time.perf_counter() - started
        self.device, self.size, self.full, self.dtype = device, size, full, dtype


def reference_jobs(models: Models, steps: int) -> dict[str, Any]:
    from api_schemas.common import AdapterChoice, Task

    engine, device = models.engine, models.device
    rows = {}
    for count in (1, 2):
        prepared = engine.prepare_images([noise_image(models.size, models.size, n) for n in range(count)])

        def job(prepared: list = prepared) -> dict[str, float]:
            sync(device)
            started = time.perf_counter()
            engine.translator.translate(prepared, "put the hat of image 2 on the cat", Task.EDIT)
            sync(device)
            translated = time.perf_counter()
            engine.adapters.activate(AdapterChoice.EDIT)  # as the reference scripts: the LoRA always on
            output = engine.pipeline(
                images=prepared, prompt="a cat in a hat", height=prepared[0].height, width=prepared[0].width,
                num_inference_steps=steps, max_area=engine.max_area, resolution_buckets=None,
                generator=torch.Generator("cpu").manual_seed(0),
            )  # fmt: skip
            sync(device)
            return {"job_s": time.perf_counter() - started, "translate_s": translated - started,
                    "step_s": output.timings["denoise"] / steps}  # fmt: skip

        job()  # warm-up
        runs = [job() for _ in range(2)]
        rows[str(count)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row = rows[str(count)]
        print(f"   {count} image(s): job {row['job_s']:.2f}s, step {row['step_s']:.3f}s")
    return {"build_s": models.build_s, "steps": steps, "images": rows}


def transformer_inputs(
    transformer: torch.nn.Module, image_tokens: int, device: torch.device, dtype: torch.dtype
) -> dict:
    config = transformer.config
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return dict(
        hidden_states=randn(1, image_tokens, config.in_channels),
        encoder_hidden_states=randn(1, 512, config.joint_attention_dim),
        pooled_projections=randn(1, config.pooled_projection_dim),
        timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
        guidance=torch.full((1,), 3.5, device=device),
        img_ids=torch.zeros(image_tokens, 3, device=device, dtype=dtype),
        txt_ids=torch.zeros(512, 3, device=device, dtype=dtype),
        return_dict=False,
    )


def profile_jobs(models: Models, steps: int, label: str) -> dict[str, dict[str, float]]:
    """The 2-image edit through `Engine.run` (translator held to its fixed length) with each step cache."""
    from api_schemas.common import StepCache, Task
    from api_schemas.jobs import JobParameters

    engine = models.engine
    images = engine.prepare_images([noise_image(models.size, models.size, n) for n in range(2)])
    found = {}
    for index, cache in enumerate(StepCache):
        params = JobParameters(instruction="put the hat of image 2 on the cat", task=Task.EDIT, steps=steps,
                               seed=0, step_cache=cache)  # fmt: skip
        if index == 0:
            engine.run(images, params)  # warm-up: VAE, text encoders, translator at these shapes
        sync(models.device)
        result = engine.run(images, params)
        sync(models.device)
        found[cache.value] = {"job_s": result.metadata.timings["total"],
                              "evaluations": result.metadata.transformer_evaluations}  # fmt: skip
        print(f"   {label:<9} job, cache {cache.value:<11}: {found[cache.value]['job_s']:.2f}s, "
              f"{found[cache.value]['evaluations']} transformer evaluations")  # fmt: skip
    return found


def profiles(models: Models, repeats: int, steps: int) -> dict[str, Any]:
    """Per-step transformer time, TFLOP/s and error against eager for each profile, then whole jobs."""
    from torch.utils.flop_counter import FlopCounterMode

    from api_schemas.common import AdapterChoice
    from models.profiles import SpeedProfile
    from models.speed import apply_profile, fp8_supported, quantize_fp8

    engine, device, dtype = models.engine, models.device, models.dtype
    transformer = engine.pipeline.transformer
    per_image = (models.size // 16) ** 2
    sizes = {f"{(per_image * (n + 1) + 512) / 1000:.1f}k": per_image * (n + 1) for n in (1, 2)}
    inputs = {
        label: transformer_inputs(transformer, tokens, device, dtype) for label, tokens in sizes.items()
    }
    engine.adapters.activate(AdapterChoice.EDIT)
    flops, eager_out, rows, jobs, compile_s = {}, {}, {}, {}, {}
    with torch.no_grad():
        for label, kwargs in inputs.items():
            counter = FlopCounterMode(display=False)
            with counter:
                transformer(**kwargs)
            flops[label] = counter.get_total_flops()

    def measure(profile: str) -> None:
        for label, kwargs in inputs.items():
            with torch.no_grad():
                sync(device)
                started = time.perf_counter()
                transformer(**kwargs)
                sync(device)
                first_s = time.perf_counter() - started
                seconds, out = timed(lambda kwargs=kwargs: transformer(**kwargs)[0], device, repeats)
            reference = eager_out.setdefault(label, out)
            error = float((out.float() - reference.float()).norm() / reference.float().norm())
            tflops = flops[label] / seconds / 1e12
            rows[f"{profile} {label}"] = {"step_s": seconds, "first_s": first_s, "tflops": tflops,
                                          "relative_error": error}  # fmt: skip
            print(f"   {profile:<9} {label}: {seconds * 1000:.1f} ms/step, {tflops:.1f} TFLOP/s, "
                  f"error {error:.2e}, first call {first_s:.1f}s")  # fmt: skip
        engine.adapters.activate(AdapterChoice.BASE)  # Engine.run picks the adapter itself
        jobs[profile] = profile_jobs(models, steps, profile)
        engine.adapters.activate(AdapterChoice.EDIT)

    def recompile_warm(profile: str) -> None:
        """The compile a restarted worker pays: torch's caches on disk warm, its in-process state gone."""
        torch._dynamo.reset()
        kwargs = next(iter(inputs.values()))
        with torch.no_grad():
            sync(device)
            started = time.perf_counter()
            transformer(**kwargs)
            sync(device)
        found = {
            "cold_s": rows[f"{profile} {next(iter(inputs))}"]["first_s"],
            "warm_s": time.perf_counter() - started,
        }
        compile_s[profile] = found
        print(
            f"   {profile:<9} compile: cold {found['cold_s']:.1f}s, "
            f"with torch's caches warm {found['warm_s']:.1f}s"
        )

    measure(SpeedProfile.REFERENCE.value)
    adapters, report = apply_profile(SpeedProfile.COMPILED, engine.pipeline, engine.adapters, device)
    engine.adapters = adapters
    adapters.activate(AdapterChoice.EDIT)
    measure(SpeedProfile.COMPILED.value)
    recompile_warm(SpeedProfile.COMPILED.value)
    if fp8_supported(device):
        report.fp8_linears = quantize_fp8(transformer, skip={t.module for t in adapters.targets})
        torch._dynamo.reset()
        measure(SpeedProfile.FP8.value)
        recompile_warm(SpeedProfile.FP8.value)
    return {
        "flops": flops, "attention_backend": report.attention_backend, "fused_targets": report.fused_targets,
        "fp8_linears": report.fp8_linears, "rows": rows, "jobs": jobs, "compile": compile_s,
    }  # fmt: skip


def cache_step(models: Models) -> dict[str, Any]:
    import PIL.Image

    from api_schemas.common import AdapterChoice, StepCache
    from models.speed import step_cache, step_cache_config

    engine, device = models.engine, models.device
    pipeline, counter = engine.pipeline, engine.evaluations
    image = PIL.Image.new("RGB", (models.size, models.size), (120, 80, 40))
    marks: list[tuple[float, int]] = []

    def on_step(pipe: Any, step: int, timestep: torch.Tensor, tensors: dict) -> dict:  # noqa: ANN401
        sync(device)
        marks.append((time.perf_counter(), counter.count))
        return {}

    config = step_cache_config(
        StepCache.TAYLORSEER, first_block_threshold=0.0, taylorseer_interval=2, dtype=models.dtype
    )
    engine.adapters.activate(AdapterChoice.EDIT)
    with step_cache(pipeline.transformer, config):
        for _ in range(2):  # the second run is timed
            marks.clear()
            counter.count = 0
            sync(device)
            marks.append((time.perf_counter(), 0))
            pipeline(images=[image], prompt="x", num_inference_steps=9, max_area=engine.max_area,
                     resolution_buckets=None, callback_on_step_end=on_step)  # fmt: skip
    full, predicted = [], []
    for (t0, c0), (t1, c1) in zip(marks, marks[1:], strict=False):
        (full if c1 > c0 else predicted).append(t1 - t0)
    result = {"full_step_s": statistics.median(full), "predicted_step_s": statistics.median(predicted)}
    result["predicted_over_full"] = result["predicted_step_s"] / result["full_step_s"]
    full_ms, predicted_ms = result["full_step_s"] * 1000, result["predicted_step_s"] * 1000
    print(f"   full step {full_ms:.1f} ms, predicted {predicted_ms:.1f} ms")
    return result


def memory_modes(args: argparse.Namespace, suite: Suite, images: list[int]) -> dict[str, Any]:
    shapes, found = args.shapes, {}
    for index, mode in enumerate(args.memory_modes):
        timeout = int(max(1, suite.left() / (len(args.memory_modes) - index)))
        if timeout < 30 and shapes == "full":
            found[mode] = {"status": "skipped: no time left"}
            continue
        out = suite.out.with_name(f"memory-{mode}.json")
        cmd = [
            sys.executable, str(ROOT / "bench" / "gpu_baseline.py"), "--shapes", shapes, "--memory", mode,
            "--steps", "4", "--max-new-tokens", "16", "--images", *map(str, images), "--out", str(out),
        ]  # fmt: skip
        cmd += ["--card-gib", str(CARDS_GIB[mode])] if shapes == "full" else ["--size", "64"]
        try:
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            status = (
                "ok"
                if result.returncode == 0
                else f"exit {result.returncode}: {result.stderr.strip()[-300:]}"
            )
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout}s"
        report = json.loads(out.read_text()) if out.is_file() else None
        found[mode] = {"status": status, "rows": report["rows"] if report else None}
        print(f"   {mode}: {status}")
    return found


def summary(results: dict[str, Any]) -> None:
    print("\n== summary")
    ceiling = results.get("matmul") or {}
    if "tflops" in ceiling:
        print(f"matmul: {ceiling['tflops']:.1f} TFLOP/s ({ceiling['dtype']})" +
              (f", fp8 {ceiling['fp8_tflops']:.1f}" if "fp8_tflops" in ceiling else ""))  # fmt: skip
    jobs = (results.get("reference_jobs") or {}).get("images") or {}
    for count, row in jobs.items():
        print(f"reference job, {count} image(s): {row['job_s']:.2f}s ({row['step_s']:.3f}s/step)")
    rows = (results.get("profiles") or {}).get("rows") or {}
    base = {k.split()[1]: v["step_s"] for k, v in rows.items() if k.startswith("reference ")}
    print(f"{'profile':<22} {'ms/step':>8} {'x ref':>6} {'TFLOP/s':>8} {'rel err':>9}")
    for name, row in rows.items():
        ratio = base.get(name.split()[1], row["step_s"]) / row["step_s"]
        print(
            f"{name:<22} {row['step_s'] * 1000:>8.1f} {ratio:>6.2f} {row['tflops']:>8.1f} "
            f"{row['relative_error']:>9.2e}"
        )
    jobs = (results.get("profiles") or {}).get("jobs") or {}
    base_job = (jobs.get("reference") or {}).get("none", {}).get("job_s")
    if base_job:
        print(f"\n2-image edit, whole job{'':<9} {'s':>8} {'x ref':>6} {'evals':>6}")
        for profile, caches in jobs.items():
            for cache, row in caches.items():
                name = f"{profile} + {cache}"
                print(
                    f"{name:<30} {row['job_s']:>8.2f} {base_job / row['job_s']:>6.2f} {row['evaluations']:>6}"
                )
    for profile, found in ((results.get("profiles") or {}).get("compile") or {}).items():
        print(f"{profile} compile: cold {found['cold_s']:.1f}s, warm caches {found['warm_s']:.1f}s")
    cache = results.get("cache_step") or {}
    if "predicted_over_full" in cache:
        print(f"a predicted (TaylorSeer) step costs {cache['predicted_over_full']:.2f} of a full one")
    for mode, found in (results.get("memory_modes") or {}).items():
        if isinstance(found, dict) and found.get("rows"):
            peaks = ", ".join(
                f"{r['images']} img: planned {r['planned_bytes'] / 2**30:.1f} / reserved "
                f"{r['peak_reserved_bytes'] / 2**30:.1f} GiB"
                for r in found["rows"]
            )
            print(f"memory {mode}: {peaks}")
        elif isinstance(found, dict):
            print(f"memory {mode}: {found.get('status')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=["full", "tiny"], default="full")
    parser.add_argument("--out", type=Path, required=True, help="the JSON results file")
    parser.add_argument("--budget-s", type=float, default=480)
    parser.add_argument("--steps", type=int, default=30, help="steps of the reference jobs")
    parser.add_argument("--size", type=int, help="side of inputs and output (default 1024; tiny: 64)")
    parser.add_argument("--tokens", type=int, default=64, help="the translator's fixed answer length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-modes", nargs="*", choices=list(CARDS_GIB), default=list(CARDS_GIB))
    parser.add_argument("--compile-cache", type=Path, help="torch's compile cache (default: a fresh one)")
    args = parser.parse_args()
    full = args.shapes == "full"
    device = torch.device("cuda" if full else "cpu")
    if full and not torch.cuda.is_available():
        print("no CUDA device; run with --shapes tiny on a CPU machine", file=sys.stderr)
        return 2
    size = args.size or (1024 if full else 64)
    suite = Suite(args.out, args.budget_s)
    # By default a fresh compile cache: the first compile is cold, a recompile after a reset warm.
    compile_cache = args.compile_cache or Path(tempfile.mkdtemp(dir=args.out.parent, prefix="torch-compile-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)
    machine = torch.cuda.get_device_name() if full else "cpu"
    suite.record(
        "machine", {"device": machine, "torch": torch.__version__, "shapes": args.shapes, "size": size}
    )
    suite.run("matmul", 10, lambda: matmul_ceilings(device))
    models: list[Models] = []
    suite.run("build", 60 if full else 5, lambda: models.append(Models(full, device, size, args.tokens)) or
              {"build_s": models[0].build_s})  # fmt: skip
    if models:
        suite.run("reference_jobs", 60 if full else 5, lambda: reference_jobs(models[0], args.steps))
        suite.run("cache_step", 30 if full else 5, lambda: cache_step(models[0]))
        suite.run("profiles", 150 if full else 10, lambda: profiles(models[0], args.repeats, args.steps))
        del models[0]
        if full:
            torch.cuda.empty_cache()
    if args.memory_modes:
        images = [0, 2, 5] if full else [0, 2]
        suite.run("memory_modes", 60 if full else 5, lambda: memory_modes(args, suite, images))
    summary(suite.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

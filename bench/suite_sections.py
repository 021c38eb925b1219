"""The GPU suite's measuring sections, one per process (`bench/gpu_suite.py` starts them).

    python bench/suite_sections.py SECTION --out out/suite.json [--shapes tiny] [...]

Each section builds what it needs once, in its own process, and appends each row to the suite's
results file the moment it is measured (`bench/suite_rows.py`):

- `matmul`: the dense (bf16; float32 on a CPU) and fp8 (`torch._scaled_mm`) matrix-product ceilings;
- `reference`: the full-size random-weight models (`bench/gpu_baseline.py`), two LoRAs with non-zero
  B, everything resident; then whole eager jobs through `Engine.run` with 1 and 2 input images
  (`--steps` steps, the translator held to `--tokens` tokens), then, as far as the time allows, the
  2-image job with each step cache;
- `compiled`, `fp8`: the transformer (translator left out) at the 1- and 2-image token counts: its
  eager per-step time and FLOPs, then the profile applied (`models.speed.apply_profile`) with its cold
  compile time, its per-step time, TFLOP/s and relative error against eager, and a warm recompile
  (torch's in-process state reset, its caches on disk kept) if time allows. `fp8` checks first, in
  a separate process, that torchao imports from `--fp8-site`, and puts that folder on `sys.path` only
  after the LoRAs are in (peft imports torchao whenever it can).

`--deadline` (a Unix time, from the suite) lets a section skip what would not finish in time.
"""

from __future__ import annotations

import argparse
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

from suite_rows import RowLog  # noqa: E402 (the bench folder on the path first)

INSTRUCTION = "put the hat of image 2 on the cat"


class Context:
    """What every section gets: the device, the shapes, the deadline and the row log."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.section = args, args.section
        self.full = args.shapes == "full"
        self.device = torch.device("cuda" if self.full else "cpu")
        self.dtype = torch.bfloat16 if self.full else torch.float32
        self.log = RowLog(args.out)

    def left(self) -> float:
        return self.args.deadline - time.time() if self.args.deadline else float("inf")

    def row(self, name: str, data: dict[str, Any], line: str) -> None:
        self.log.append(self.section, name, data)
        print(f"   {self.section} | {name}: {line}", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
        """Median seconds of `repeats` calls after one warm-up, and the last result."""
        result = fn()
        times = []
        for _ in range(repeats):
            self.sync()
            started = time.perf_counter()
            result = fn()
            self.sync()
            times.append(time.perf_counter() - started)
        return statistics.median(times), result


def matmul(ctx: Context) -> None:
    from models.speed import fp8_supported

    n = 8192 if ctx.full else 512
    a = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    seconds, _ = ctx.timed(lambda: a @ b, 10)
    tflops = 2 * n**3 / seconds / 1e12
    ctx.row("dense", {"n": n, "dtype": str(ctx.dtype), "tflops": tflops}, f"{ctx.dtype} {tflops:.1f} TFLOP/s")
    if not fp8_supported(ctx.device):
        ctx.row("fp8", {"skipped": f"no fp8 matrix units on {ctx.device}"}, "skipped")
        return
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
    one = torch.ones((), device=ctx.device)
    seconds, _ = ctx.timed(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), 10)
    tflops = 2 * n**3 / seconds / 1e12
    ctx.row("fp8", {"n": n, "dtype": "float8_e4m3fn", "tflops": tflops}, f"{tflops:.1f} TFLOP/s")


def build_engine(ctx: Context, translator: bool) -> Any:  # noqa: ANN401 (models.engine.Engine)
    """The models at the suite's shapes, random weights, everything resident: built once per process."""
    from gpu_baseline import add_random_loras, build_full, build_tiny_shapes

    from models.engine import Engine
    from models.memory import ASSUMED_LORA_RANK
    from models.placement import Placement
    from models.profiles import SpeedProfile
    from models.settings import EngineSettings
    from models.tiny import ensure_tiny

    args = ctx.args
    started = time.perf_counter()
    tiny_root = ensure_tiny(Path(tempfile.mkdtemp(prefix="dreamomni2-suite-")))
    if ctx.full:
        pipeline, vlm = build_full(str(ctx.device), ctx.dtype, tiny_root, translator=translator)
    else:
        pipeline, vlm = build_tiny_shapes(tiny_root)
    adapters = add_random_loras(pipeline, ASSUMED_LORA_RANK if ctx.full else 4)
    vlm = vlm if translator else None
    if vlm is not None:
        vlm.max_new_tokens = args.tokens
    settings = EngineSettings(
        preset="dreamomni2" if ctx.full else "tiny", device=str(ctx.device), max_area=args.size**2,
        bucket_scale=args.size / 1024 if ctx.full else None, memory_check=False, translator=translator,
        speed=SpeedProfile.REFERENCE,  # a section applies its profile itself, after measuring eager
    )  # fmt: skip
    placement = Placement(settings.memory, str(ctx.device), str(ctx.device) if translator else None)
    engine = Engine.assemble(settings, pipeline, adapters, vlm, placement)
    ctx.sync()
    seconds = time.perf_counter() - started
    params_b = sum(p.numel() for p in pipeline.transformer.parameters()) / 1e9
    found = {"build_s": seconds, "transformer_params_b": params_b, "translator": translator}
    ctx.row("build", found, f"{seconds:.1f}s (transformer {params_b:.2f}B params, translator {translator})")
    return engine


def noise_images(ctx: Context, count: int) -> list:
    from gpu_baseline import noise_image

    return [noise_image(ctx.args.size, ctx.args.size, n) for n in range(count)]


def run_job(ctx: Context, engine: Any, images: list, **params: Any) -> dict[str, Any]:  # noqa: ANN401
    """One job through `Engine.run`: wall seconds, the engine's own timings, what it evaluated."""
    from api_schemas.common import Task
    from api_schemas.jobs import JobParameters

    job = JobParameters(instruction=INSTRUCTION, task=Task.EDIT, steps=ctx.args.steps, seed=0, **params)
    ctx.sync()
    started = time.perf_counter()
    meta = engine.run(images, job).metadata
    ctx.sync()
    return {"job_s": time.perf_counter() - started, "translate_s": meta.timings.get("translate", 0.0),
            "step_s": meta.timings["denoise"] / ctx.args.steps, "evaluations": meta.transformer_evaluations,
            "adapter": meta.adapter.value, "timings": meta.timings}  # fmt: skip


def reference(ctx: Context) -> None:
    from api_schemas.common import StepCache

    engine = build_engine(ctx, translator=True)
    steps, last_s = ctx.args.steps, 0.0
    for count in (1, 2):
        images = engine.prepare_images(noise_images(ctx, count))
        run_job(ctx, engine, images)  # warm-up: kernels, the allocator, the translator at these shapes
        found = run_job(ctx, engine, images)
        found.update(images=count, steps=steps, tokens=ctx.args.tokens)
        last_s = found["job_s"]
        ctx.row(f"job {count} image(s)", found, f"job {found['job_s']:.2f}s, step {found['step_s']:.3f}s, "
                f"translate {found['translate_s']:.2f}s, adapter {found['adapter']}")  # fmt: skip
    for cache in StepCache:
        if cache is StepCache.NONE:
            continue
        if ctx.left() < 3 * last_s + 10:
            ctx.row(
                f"job 2 image(s), {cache.value}", {"skipped": f"{ctx.left():.0f}s left"}, "skipped: no time"
            )
            continue
        found = run_job(ctx, engine, images, step_cache=cache)
        found.update(images=2, steps=steps, step_cache=cache.value)
        ctx.row(f"job 2 image(s), {cache.value}", found,
                f"job {found['job_s']:.2f}s, {found['evaluations']} transformer evaluations")  # fmt: skip


def transformer_inputs(ctx: Context, transformer: torch.nn.Module, image_tokens: int) -> dict[str, Any]:
    config = transformer.config
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=ctx.device, dtype=ctx.dtype)

    return dict(
        hidden_states=randn(1, image_tokens, config.in_channels),
        encoder_hidden_states=randn(1, 512, config.joint_attention_dim),
        pooled_projections=randn(1, config.pooled_projection_dim),
        timestep=torch.full((1,), 0.5, device=ctx.device, dtype=ctx.dtype),
        guidance=torch.full((1,), 3.5, device=ctx.device),
        img_ids=torch.zeros(image_tokens, 3, device=ctx.device, dtype=ctx.dtype),
        txt_ids=torch.zeros(512, 3, device=ctx.device, dtype=ctx.dtype),
        return_dict=False,
    )


def check_torchao(ctx: Context) -> None:
    """Check in a throwaway process, before anything is built, that torchao imports from `--fp8-site`
    with this torch."""
    site = ctx.args.fp8_site
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import torch, torchao; "
        "print(torchao.__version__, torchao.__file__, torch.__version__)"
    )
    try:
        checked = subprocess.run(
            [sys.executable, "-c", code, str(site or "")], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError("importing torchao took over 120 s") from exc
    if checked.returncode != 0:
        where = f"from {site}" if site else "(no --fp8-site given)"
        raise RuntimeError(f"torchao does not import {where}: {checked.stderr.strip()[-600:]}")
    version, path, torch_version = checked.stdout.split()[-3:]
    ctx.row("torchao", {"version": version, "from": path, "torch": torch_version}, f"{version} ({path})")


def eager_steps(ctx: Context, transformer: torch.nn.Module, inputs: dict[str, dict]) -> dict[str, tuple]:
    """The eager transformer at each token count: (its output, seconds per step, FLOPs per step)."""
    from torch.utils.flop_counter import FlopCounterMode

    eager = {}
    with torch.no_grad():
        for label, kwargs in inputs.items():
            counter = FlopCounterMode(display=False)
            with counter:
                transformer(**kwargs)
            flops = counter.get_total_flops()
            seconds, out = ctx.timed(lambda kwargs=kwargs: transformer(**kwargs)[0], ctx.args.repeats)
            eager[label] = (out, seconds, flops)
            found = {"tokens": kwargs["hidden_states"].shape[1] + 512, "step_s": seconds, "flops": flops,
                     "tflops": flops / seconds / 1e12}  # fmt: skip
            ctx.row(f"eager {label}", found, f"{seconds * 1000:.1f} ms/step, {found['tflops']:.1f} TFLOP/s")
    return eager


def profiled_steps(
    ctx: Context, name: str, transformer: torch.nn.Module, inputs: dict[str, dict], eager: dict[str, tuple]
) -> float:
    """The profiled transformer at each token count against eager; returns the cold compile's seconds."""
    cold_s = 0.0
    with torch.no_grad():
        for index, (label, kwargs) in enumerate(inputs.items()):
            ctx.sync()
            started = time.perf_counter()
            transformer(**kwargs)
            ctx.sync()
            first_s = time.perf_counter() - started
            if index == 0:
                cold_s = first_s
                note = "the first call; a fresh compile cache unless --compile-cache"
                ctx.row("compile cold", {"seconds": first_s, "tokens": label}, f"{first_s:.1f}s ({note})")
            seconds, out = ctx.timed(lambda kwargs=kwargs: transformer(**kwargs)[0], ctx.args.repeats)
            reference, eager_s, flops = eager[label]
            error = float((out.float() - reference.float()).norm() / reference.float().norm())
            # dynamo's graphs so far: one more per token count would be a recompile per image count.
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            found = {"tokens": kwargs["hidden_states"].shape[1] + 512, "step_s": seconds, "first_s": first_s,
                     "tflops": flops / seconds / 1e12, "relative_error": error,
                     "speedup": eager_s / seconds, "graphs": graphs}  # fmt: skip
            ctx.row(f"{name} {label}", found, f"{seconds * 1000:.1f} ms/step ({eager_s / seconds:.2f}x "
                    f"eager), {found['tflops']:.1f} TFLOP/s, relative error {error:.2e}, "
                    f"first call {first_s:.1f}s, {graphs} graphs")  # fmt: skip
    return cold_s


def recompile_warm(
    ctx: Context, transformer: torch.nn.Module, label: str, kwargs: dict, cold_s: float
) -> None:
    """The compile a restarted worker pays: torch's in-process state reset, its caches on disk kept."""
    if ctx.left() < 2 * cold_s + 10:
        ctx.row("compile warm", {"skipped": f"{ctx.left():.0f}s left"}, "skipped: no time")
        return
    torch._dynamo.reset()
    with torch.no_grad():
        ctx.sync()
        started = time.perf_counter()
        transformer(**kwargs)
        ctx.sync()
    warm_s = time.perf_counter() - started
    ctx.row("compile warm", {"seconds": warm_s, "tokens": label}, f"{warm_s:.1f}s")


def profile(ctx: Context, name: str) -> None:
    """The transformer per step, eager and then as profile `name`; the cold and warm compile."""
    from api_schemas.common import AdapterChoice
    from models.profiles import SpeedProfile
    from models.speed import apply_profile, compile_preflight, fp8_supported

    wanted = SpeedProfile(name)
    fp8, site = wanted is SpeedProfile.FP8, ctx.args.fp8_site
    runs = not fp8 or fp8_supported(ctx.device)
    if fp8 and (site or runs):
        check_torchao(ctx)
    if not runs and not site:
        ctx.row("profile", {"skipped": f"no fp8 matrix units on {ctx.device}"}, "skipped")
        return
    problem = compile_preflight(ctx.device)  # seconds, where a build would take a minute
    ctx.row("compile preflight", {"problem": problem}, problem or "ok")
    if problem:
        raise RuntimeError(f"this machine cannot compile for {ctx.device}: {problem}")
    engine = build_engine(ctx, translator=False)
    transformer = engine.pipeline.transformer
    per_image = (ctx.args.size // 16) ** 2
    tokens = {f"{(per_image * (n + 1) + 512) / 1000:.1f}k": per_image * (n + 1) for n in (1, 2)}
    inputs = {label: transformer_inputs(ctx, transformer, count) for label, count in tokens.items()}
    engine.adapters.activate(AdapterChoice.EDIT)
    eager = eager_steps(ctx, transformer, inputs)
    if fp8 and site:
        sys.path.insert(0, str(site))  # only now: the LoRAs are in, peft has looked for torchao
        import torchao.quantization  # noqa: F401 (what quantize_fp8 imports, here beside peft)
    if not runs:
        ctx.row("profile", {"skipped": f"no fp8 matrix units on {ctx.device} (torchao imported beside peft)"},
                "skipped")  # fmt: skip
        return
    adapters, report = apply_profile(wanted, engine.pipeline, engine.adapters, ctx.device)
    engine.adapters = adapters
    adapters.activate(AdapterChoice.EDIT)
    ctx.row("profile", {"attention_backend": report.attention_backend, "fused_targets": report.fused_targets,
                        "fp8_linears": report.fp8_linears},
            f"attention {report.attention_backend}, {report.fused_targets} fused LoRA targets, "
            f"{report.fp8_linears} fp8 linears")  # fmt: skip
    cold_s = profiled_steps(ctx, name, transformer, inputs, eager)
    label = next(iter(inputs))
    recompile_warm(ctx, transformer, label, inputs[label], cold_s)


SECTIONS: dict[str, Callable[[Context], None]] = {
    "matmul": matmul,
    "reference": reference,
    "compiled": lambda ctx: profile(ctx, "compiled"),
    "fp8": lambda ctx: profile(ctx, "fp8"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=list(SECTIONS))
    parser.add_argument("--shapes", choices=["full", "tiny"], default="full")
    parser.add_argument("--out", type=Path, required=True, help="the suite's JSON results file")
    parser.add_argument("--deadline", type=float, help="Unix time by which the section must be done")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fp8-site", type=Path)
    args = parser.parse_args()
    if args.shapes == "full" and not torch.cuda.is_available():
        print("no CUDA device; run with --shapes tiny on a CPU machine", file=sys.stderr)
        return 2
    SECTIONS[args.section](Context(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

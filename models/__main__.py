"""Run one DreamOmni2 job without the service, or plan a worker's GPU memory.

    python -m models run --image a.png --image b.png --task edit "put the hat of image 2 on him" -o out.png
    python -m models mix "a cat made of glass" "a teapot made of glass" --attribute material --seed 3
    python -m models plan --memory balanced --images 3 [--batch 4] [--size 1024] [--json]
                          [--card 44 --host 64]
    python -m models plan --memory low --feature-mixing     # a Feature Mixing pair, and its cost

Settings come from `DREAMOMNI2_*` variables (the tiny CPU preset by default); flags override a few.
`plan` loads and downloads nothing: it sizes the published architectures on the meta device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from api_schemas.common import MixBlocks, Task
from api_schemas.errors import ServiceError
from api_schemas.images import load_image
from api_schemas.jobs import JobParameters, resolve_job

if TYPE_CHECKING:
    from models.memory import ArchitectureSizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one job and save the image")
    run.add_argument(
        "instruction", help="what to do, in plain words (refer to images as image 1, image 2, ...)"
    )
    run.add_argument("--image", action="append", default=[], type=Path, help="input image; repeat, in order")
    run.add_argument(
        "--task",
        choices=[Task.EDIT.value, Task.GENERATE.value],
        help="edit or generate (default: by image count); a Feature Mixing pair: `mix`",
    )
    run.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="where to save the result")
    run.add_argument("--seed", type=int)
    run.add_argument("--steps", type=int)
    run.add_argument("--guidance", type=float)
    run.add_argument("--width", type=int, help="generation only")
    run.add_argument("--height", type=int, help="generation only")
    run.add_argument("--no-translate", action="store_true", help="use the instruction as the prompt")
    run.add_argument("--preset", choices=["tiny", "dreamomni2"], help="overrides DREAMOMNI2_PRESET")

    mix = commands.add_parser(
        "mix",
        help="generate a Feature Mixing pair (source, target) and save both images",
        description="Feature Mixing, the method's paired-data synthesis: the source and the target "
        "prompt sampled from one seed, the target attending to the source's image tokens.",
    )
    mix.add_argument("source_prompt", help="the source image's prompt (the image that has the attribute)")
    mix.add_argument("target_prompt", help="the target image's prompt (the image that takes it)")
    mix.add_argument("--attribute", help="a label for the shared attribute, kept with the job")
    mix.add_argument("--source-output", type=Path, default=Path("source.png"), help="the source's file")
    mix.add_argument("--target-output", type=Path, default=Path("target.png"), help="the target's file")
    mix.add_argument("--seed", type=int)
    mix.add_argument("--steps", type=int)
    mix.add_argument("--guidance", type=float)
    mix.add_argument("--width", type=int)
    mix.add_argument("--height", type=int)
    mix.add_argument("--mix-blocks", choices=[b.value for b in MixBlocks], help="default all")
    mix.add_argument("--mix-steps", type=float, help="share of steps that mix, from the first (default 1)")
    mix.add_argument("--mix-strength", type=float, help="0..1 (default 1, the plain formula)")
    mix.add_argument("--preset", choices=["tiny", "dreamomni2"], help="overrides DREAMOMNI2_PRESET")

    from models.modes import MemoryMode

    plan = commands.add_parser(
        "plan",
        help="predict a worker's GPU memory peak for a memory mode (no weights loaded or downloaded)",
        description="Predict the GPU peak of the published models in a memory mode: weight bytes per "
        "component (full-size configs on the meta device), activations per stage for N input images, "
        "and the peak per device.",
    )
    plan.add_argument("--memory", choices=[m.value for m in MemoryMode], default=MemoryMode.RESIDENT.value,
                      help="memory mode (DREAMOMNI2_MEMORY); default resident")  # fmt: skip
    plan.add_argument(
        "--images",
        type=int,
        help="input images per job (default 5, the image limit; 0 with --feature-mixing)",
    )
    plan.add_argument("--batch", type=int, default=1,
                      help="output images of one job sampled together (default 1)")  # fmt: skip
    plan.add_argument("--size", type=int, default=1024,
                      help="side of the inputs' buckets and the output in pixels (default 1024)")  # fmt: skip
    plan.add_argument("--device", default="cuda", help="the pipeline's device (default cuda)")
    plan.add_argument("--translator-device", default="auto",
                      help="auto (the pipeline's device), cuda:1, cpu, or none (translator off)")  # fmt: skip
    plan.add_argument("--max-new-tokens", type=int, help="translator answer budget (default 1024)")
    plan.add_argument("--lora-rank", type=int, help="LoRA rank to assume (the release does not state it)")
    plan.add_argument("--card", type=float, metavar="GIB",
                      help="also check the fit on a GPU with GIB free; the most images that fit")  # fmt: skip
    plan.add_argument("--host", type=float, metavar="GIB",
                      help="with --card: the host has GIB of memory available too")  # fmt: skip
    plan.add_argument("--json", action="store_true", help="print one JSON object (byte counts as integers)")
    plan.add_argument("--table", action="store_true",
                      help="print the docs' card -> mode -> peak -> most images table instead")  # fmt: skip
    plan.add_argument("--feature-mixing", action="store_true",
                      help="plan a Feature Mixing pair and its cost against one generation")  # fmt: skip
    plan.add_argument("--mixing-batched", action="store_true",
                      help="with --feature-mixing: the batch-2 form, not the exact two-pass one")  # fmt: skip
    return parser


#: The setups of the docs' table: (label, card sizes sold in GB per GPU, mode, translator device). The
#: last GPU of a two-GPU setup holds the translator. Each size is checked on its smallest known card.
CARD_SETUPS = [
    ("24 GB (RTX 4090, L4, A10)", [24], "low", "auto"),
    ("24 GB, bf16 exact", [24], "stream", "auto"),
    ("40 GB (A100 40 GB)", [40], "low", "auto"),
    ("40 GB, translator on the CPU", [40], "balanced", "cpu"),
    ("48 GB (L40S, RTX 6000 Ada, A6000)", [48], "balanced", "auto"),
    ("80 GB and up (A100/H100 80 GB, H200)", [80], "resident", "auto"),
    ("two GPUs, 40-48 + 24 GB", [40, 24], "resident", "cuda:1"),
    ("two GPUs, 24 + 24 GB", [24, 24], "low", "cuda:1"),
]


def card_table(sizes: ArchitectureSizes, size: int, limit: int) -> str:
    from models.cards import card_class
    from models.memory import GiB, max_images_that_fit, plan_memory
    from models.modes import MemoryMode

    lines = [
        f"| card | GiB (smallest) | DREAMOMNI2_MEMORY | translator | predicted GPU peak, 2 / 5 images at "
        f"{size}² | host memory (weights kept there) | most images |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, classes, mode, translator in CARD_SETUPS:
        cards = [card_class(gb) for gb in classes]
        devices = ["cuda:0"] if len(cards) == 1 else ["cuda:0", "cuda:1"]
        free = {d: card.usable_bytes for d, card in zip(devices, cards, strict=True)}
        where = "cuda:0" if translator == "auto" else translator
        kwargs = dict(size=size, device="cuda:0", translator_device=where, sizes=sizes)
        peaks = []
        for images in (2, 5):
            plan = plan_memory(MemoryMode(mode), images, **kwargs)
            peaks.append(" + ".join(f"{n / GiB:.1f}" for n in plan.devices.values()))
        most = max_images_that_fit(MemoryMode(mode), free, limit, **kwargs)
        shown = "none" if most is None else (f"{most}+" if most == limit else str(most))
        gib = " + ".join(f"{card.total_gib:.1f} ({card.name})" for card in cards)
        host = f"{plan.host_bytes / GiB:.1f} GiB"
        lines.append(
            f"| {label} | {gib} | `{mode}` | {where} | {peaks[0]} / {peaks[1]} GiB | {host} | {shown} |"
        )
    return "\n".join(lines)


#: How far `plan --card` searches for the most input images that fit.
MAX_PLANNED_IMAGES = 10
#: How far `plan --card` searches for the most output images sampled together.
MAX_PLANNED_BATCH = 8


def plan_usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with `plan`'s numbers, if anything."""
    if args.feature_mixing and args.images:
        return "a Feature Mixing pair takes no input image; leave --images out"
    if args.images < 0:
        return "--images must be 0 or more"
    if args.batch < 1 or (args.feature_mixing and args.batch != 1):
        return "--batch must be 1 or more (a Feature Mixing pair is one)"
    if args.size < 64 or args.size % 16:
        return "--size must be a multiple of 16 of at least 64"
    if args.host is not None and args.card is None:
        return "--host goes with --card"
    return None


def plan(args: argparse.Namespace) -> int:
    import json

    from models.cards import CONTEXT_ALLOWANCE_BYTES
    from models.memory import (
        FIT_HEADROOM,
        HOST_OVERHEAD_BYTES,
        GiB,
        fits,
        max_batch_that_fits,
        max_images_that_fit,
        mixing_cost,
        plan_memory,
        published_sizes,
    )
    from models.modes import MemoryMode

    if args.images is None:
        args.images = 0 if args.feature_mixing else 5
    problem = plan_usage_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    translator_device = None if args.translator_device == "none" else args.translator_device
    kwargs = dict(
        size=args.size,
        device=args.device,
        translator_device=translator_device,
        new_tokens=args.max_new_tokens,
        sizes=published_sizes(args.lora_rank) if args.lora_rank else published_sizes(),
    )
    if args.table:
        print(card_table(kwargs["sizes"], args.size, MAX_PLANNED_IMAGES))
        print(
            f"\nGiB: the smallest card of the size class as the driver reports it (cards are sold in GB, "
            f"10^9 bytes). Most images: input images per job whose predicted peak, plus "
            f"{FIT_HEADROOM:.0%} headroom, fits that card less {CONTEXT_ALLOWANCE_BYTES / GiB:g} GiB for "
            f"the CUDA context (an allowance); searched up to {MAX_PLANNED_IMAGES}. Peaks per GPU, "
            f"PyTorch allocations. Host memory: the pinned blocks of the models kept off the GPU (plus "
            f"any model on the CPU); a worker needs about {HOST_OVERHEAD_BYTES / GiB:.0f} GiB more."
        )
        return 0
    mixing = dict(feature_mixing=True, mixing_batched=args.mixing_batched) if args.feature_mixing else {}
    result = plan_memory(MemoryMode(args.memory), args.images, batch=args.batch, **kwargs, **mixing)
    report = result.to_dict()
    cost = None
    if args.feature_mixing:
        cost = mixing_cost(MemoryMode(args.memory), batched=args.mixing_batched, **kwargs)
        report["feature_mixing_cost"] = cost.to_dict()
    if args.card is not None:
        free = {d: int(args.card * GiB) for d in result.devices}
        host = None if args.host is None else int(args.host * GiB)
        report["card_bytes"] = int(args.card * GiB)
        report["host_available_bytes"] = host
        report["fits"] = fits(result, free, host)
        report["max_images"] = max_images_that_fit(
            MemoryMode(args.memory), free, MAX_PLANNED_IMAGES, host, **kwargs
        )
        if not args.feature_mixing:
            # What DREAMOMNI2_BATCH_IMAGES=auto would sample together with this many input images.
            report["max_batch"] = max_batch_that_fits(
                MemoryMode(args.memory), args.images, free, MAX_PLANNED_BATCH, host, **kwargs
            )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(result.format())
    if cost is not None:
        print(cost.format())
    if args.card is not None:
        verdict = "fits" if report["fits"] else "does NOT fit"
        most = report["max_images"]
        host = "" if args.host is None else f" and {args.host:g} GiB of host memory"
        print(
            f"on a GPU with {args.card:g} GiB free{host}: {verdict} (with {FIT_HEADROOM:.0%} headroom"
            + ("" if args.host is None else f", {HOST_OVERHEAD_BYTES / GiB:.0f} GiB for the process")
            + "); "
            + (f"up to {most} input image(s) fit" if most is not None else "not even a text-only job fits")
            + (
                f"; with {args.images} input image(s), {report['max_batch']} output images sampled together"
                if report.get("max_batch", 1) > 1 and report["fits"]
                else ""
            )
        )
    return 0


def run(args: argparse.Namespace) -> int:
    from models.engine import Engine
    from models.settings import EngineSettings

    params = JobParameters(
        instruction=args.instruction,
        task=args.task,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        translate=not args.no_translate,
    )
    overrides = {"preset": args.preset} if args.preset else {}
    settings = EngineSettings(**overrides)
    images = []
    for path in args.image:
        try:
            images.append(path.read_bytes())
        except OSError as exc:
            print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr)
            return 2

    # Refuse a bad request before spending minutes on loading the models.
    try:
        resolve_job(params, len(images), settings.limits)
        images = [
            load_image(data, limits=settings.limits.image_limits(), label=f"image {n} ({path})")
            for n, (data, path) in enumerate(zip(images, args.image, strict=True), start=1)
        ]
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2

    print(f"loading the {settings.preset} preset ...", file=sys.stderr)
    engine = Engine.from_settings(settings)

    progress = DenoiseBar()
    try:
        result = engine.run(images, params, on_progress=progress)
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    finally:
        progress.close()

    meta = result.metadata
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(args.output)
    how = "translated" if meta.translated else f"instruction as is ({meta.fallback_reason})"
    print(f"adapter:  {meta.adapter.value}")
    print(f"prompt:   {meta.prompt}  [{how}]")
    print(f"seed:     {meta.seed}")
    print("timings:  " + ", ".join(f"{stage} {seconds:.3f}s" for stage, seconds in meta.timings.items()))
    print(f"saved:    {args.output} ({meta.width}x{meta.height})")
    return 0


def mix(args: argparse.Namespace) -> int:
    from models.engine import Engine
    from models.settings import EngineSettings

    params = JobParameters(
        task=Task.FEATURE_MIXING,
        source_prompt=args.source_prompt,
        target_prompt=args.target_prompt,
        attribute=args.attribute,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        mix_blocks=args.mix_blocks,
        mix_steps=args.mix_steps,
        mix_strength=args.mix_strength,
    )
    settings = EngineSettings(**({"preset": args.preset} if args.preset else {}))
    try:
        resolve_job(params, 0, settings.limits)
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"loading the {settings.preset} preset ...", file=sys.stderr)
    engine = Engine.from_settings(settings)
    progress = DenoiseBar()
    try:
        result = engine.run([], params, on_progress=progress)
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    finally:
        progress.close()
    meta = result.metadata
    for image, path in zip(result.images, (args.source_output, args.target_output), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    print(f"seed:     {meta.seed}")
    print("mixing:   " + ", ".join(f"{k} {v}" for k, v in (meta.mixing or {}).items()))
    print("timings:  " + ", ".join(f"{stage} {seconds:.3f}s" for stage, seconds in meta.timings.items()))
    size = f"{meta.width}x{meta.height}"
    print(f"saved:    {args.source_output} (source), {args.target_output} (target), {size}")
    return 0


class DenoiseBar:
    """An engine progress callback that shows the denoising steps as a bar on stderr."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, stage: str, step: int, total: int) -> None:
        if stage != "denoise":
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc="denoise", unit="step", file=sys.stderr)
        self.bar.n = step
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"plan": plan, "mix": mix, "run": run}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""Run one DreamOmni2 job without the service.

    python -m models run --image a.png --image b.png --task edit "put the hat of image 2 on him" -o out.png

Settings come from `DREAMOMNI2_*` variables (the tiny CPU preset by default); flags override a few.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from api_schemas.common import Task
from api_schemas.errors import ServiceError
from api_schemas.images import load_image
from api_schemas.jobs import JobParameters, resolve_job


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one job and save the image")
    run.add_argument(
        "instruction", help="what to do, in plain words (refer to images as image 1, image 2, ...)"
    )
    run.add_argument("--image", action="append", default=[], type=Path, help="input image; repeat, in order")
    run.add_argument(
        "--task", choices=[t.value for t in Task], help="edit or generate (default: by image count)"
    )
    run.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="where to save the result")
    run.add_argument("--seed", type=int)
    run.add_argument("--steps", type=int)
    run.add_argument("--guidance", type=float)
    run.add_argument("--width", type=int, help="generation only")
    run.add_argument("--height", type=int, help="generation only")
    run.add_argument("--no-translate", action="store_true", help="use the instruction as the prompt")
    run.add_argument("--preset", choices=["tiny", "dreamomni2"], help="overrides DREAMOMNI2_PRESET")
    return parser


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

    bar: tqdm | None = None

    def on_progress(stage: str, step: int, total: int) -> None:
        nonlocal bar
        if stage != "denoise":
            return
        if bar is None:
            bar = tqdm(total=total, desc="denoise", unit="step", file=sys.stderr)
        bar.n = step
        bar.refresh()

    try:
        result = engine.run(images, params, on_progress=on_progress)
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

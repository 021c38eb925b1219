"""The `dreamomni2` command: edit and generate images with the service, and look after jobs.

    dreamomni2 edit bag.png dress.png "make the bag in image 1 use the pattern of image 2" -o out.png
    dreamomni2 generate style.png "a portrait in the style of image 1" --seed 7 -o portrait.png
    dreamomni2 mix "a woven straw hat" "a teapot" --attribute material -o hat.png  # hat-source/-target.png
    dreamomni2 prompts attributes.txt -o prompts.jsonl --per-attribute 4  # prompt pairs from keywords
    dreamomni2 dataset prompts.jsonl pairs/ --concurrency 4  # a Feature Mixing dataset, resumable
    dreamomni2 bench DreamOmni2Bench/ bench-out/ --steps 28  # the paper's benchmark: results and a report
    dreamomni2 status JOB | result JOB -o out.png | cancel JOB | events JOB

Progress goes to stderr (a bar on a terminal, plain lines otherwise); results go to stdout (the file
written, or with --json the job object), so the output pipes into other tools.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict

from tqdm import tqdm

from api_schemas.api import Job, JobStatus
from api_schemas.common import Task
from dreamomni2._core import __version__
from dreamomni2.aio import AsyncClient
from dreamomni2.cli_common import (
    EXIT_CANCELED,
    EXIT_CODES_HELP,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    existing_file,
    exit_code,
    job_json,
    positive_int,
    print_json,
    say,
)
from dreamomni2.cli_options import (
    BENCH_HELP,
    add_bench_command,
    add_common,
    add_job_options,
    add_mixing_options,
    add_sampling_options,
)
from dreamomni2.cli_output import describe_event, describe_job, progress_display, save_pair, save_result
from dreamomni2.client import Client
from dreamomni2.dataset import (
    DatasetFolder,
    PairOptions,
    PairOutcome,
    make_dataset,
    plan_dataset,
    read_prompts,
)
from dreamomni2.errors import (
    DreamOmni2Error,
    JobError,
)
from dreamomni2.prompts import PROMPTS_HELP, add_prompts_command


def wait_for(client: Client, args: argparse.Namespace, job: Job | str) -> Job:
    display = progress_display(args)
    try:
        return client.wait(job, on_progress=display, timeout=args.timeout)
    finally:
        if display is not None:
            display.close()


def run_submit(client: Client, args: argparse.Namespace, task: Task) -> int:
    if task is Task.EDIT:
        images, instruction = [args.image, *args.rest[:-1]], args.rest[-1]
    else:
        images, instruction = args.rest[:-1], args.rest[-1]
    job = client.submit(
        instruction,
        images,
        task=task,
        seed=args.seed,
        steps=args.steps,
        num_images=args.num_images,
        guidance=args.guidance,
        size=getattr(args, "size", None),
        translate=False if args.no_translate else None,
        output_format=args.format,
        step_cache=args.step_cache,
        loras=args.loras,
        webhook_url=args.webhook_url,
        webhook_events=args.webhook_events,
        deadline_s=args.deadline,
        idempotency_key=args.idempotency_key,
    )
    return queued_or_saved(client, args, job, save_result)


def queued_or_saved(
    client: Client, args: argparse.Namespace, job: Job, save: Callable[[Client, argparse.Namespace, Job], int]
) -> int:
    """With --no-wait, print the queued job; else wait for it and `save` its result."""
    if args.no_wait:
        if args.json:
            print_json(job_json(job))
        else:
            print(job.id, flush=True)
        return EXIT_OK
    args.current_job = job.id  # for the Ctrl-C hint
    return save(client, args, wait_for(client, args, job))


def pair_options(args: argparse.Namespace) -> PairOptions:
    """The mixing and sampling options of `mix` and `dataset` (None where the option was left out)."""
    return PairOptions(
        mix_blocks=args.mix_blocks,
        mix_steps=args.mix_steps,
        mix_strength=args.mix_strength,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        size=args.size,
        output_format=args.format,
    )


def run_mix(client: Client, args: argparse.Namespace) -> int:
    job = client.feature_mix(
        args.source_prompt,
        args.target_prompt,
        attribute=args.attribute,
        **asdict(pair_options(args)),
        webhook_url=args.webhook_url,
        webhook_events=args.webhook_events,
        deadline_s=args.deadline,
        idempotency_key=args.idempotency_key,
    )
    return queued_or_saved(client, args, job, save_pair)


class DatasetProgress:
    """The dataset's progress on stderr: a bar of pairs on a terminal, a line per pair otherwise."""

    def __init__(self, total: int, quiet: bool) -> None:
        self._bar: tqdm | None = None
        self._lines = not quiet and not sys.stderr.isatty()
        if not quiet and not self._lines:
            self._bar = tqdm(total=total, desc="pairs", unit="pair", file=sys.stderr, dynamic_ncols=True)
        self._total = total
        self._count = 0
        self._failed = 0

    def __call__(self, outcome: PairOutcome) -> None:
        self._count += 1
        self._failed += outcome.status == "failed"
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self._failed} failed" if self._failed else "", refresh=False)
            self._bar.update(1)
        elif self._lines:
            what = outcome.record["job_id"] if outcome.record else outcome.message
            say(f"[{self._count}/{self._total}] line {outcome.line}: {outcome.status} ({what})")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def dataset_summary(outcomes: list[PairOutcome], folder: DatasetFolder, args: argparse.Namespace) -> int:
    """Print how each line went (stdout); EXIT_FAILED when any failed."""
    count = {status: sum(o.status == status for o in outcomes) for status in ("done", "skipped", "failed")}
    failed = [o for o in outcomes if o.status == "failed"]
    if args.json:
        print_json({**count, "manifest": str(folder.manifest),
                    "failures": [{"line": o.line, "pair_id": o.pair_id, "message": o.message,
                                  "code": getattr(o.error, "code", None)} for o in failed]})  # fmt: skip
    else:
        print(f"done {count['done']}, skipped {count['skipped']}, failed {count['failed']}; "
              f"manifest {folder.manifest}", flush=True)  # fmt: skip
        for outcome in failed:
            print(f"line {outcome.line}: {outcome.message}", flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def run_dataset(client: Client, args: argparse.Namespace) -> int:
    # The pairs go through an AsyncClient (`client` stays unused): asyncio bounds the concurrency,
    # and Ctrl-C cancels the waits at once.
    pairs, bad_lines = read_prompts(args.prompts)
    options = pair_options(args)
    folder = DatasetFolder(args.out_dir)
    plan = plan_dataset(pairs, bad_lines, folder, options)
    display = DatasetProgress(len(plan.todo), args.quiet)
    finished: list[PairOutcome] = []

    def on_outcome(outcome: PairOutcome) -> None:
        finished.append(outcome)
        display(outcome)

    async def make() -> list[PairOutcome]:
        async with AsyncClient(args.server, args.api_key) as pairs_client:
            return await make_dataset(pairs_client, plan, folder, options, concurrency=args.concurrency,
                                      timeout=args.timeout, on_outcome=on_outcome)  # fmt: skip

    try:
        outcomes = asyncio.run(make())
    except KeyboardInterrupt:
        display.close()
        say(f"\ninterrupted after {len(finished)} of {len(plan.todo)} pair(s); run the same command again "
            "to go on (finished pairs are skipped, submitted ones picked up)")  # fmt: skip
        return EXIT_INTERRUPTED
    finally:
        display.close()
    return dataset_summary(outcomes, folder, args)


def run_status(client: Client, args: argparse.Namespace) -> int:
    job = client.get(args.job)
    if args.json:
        print_json(job_json(job))
    else:
        print(describe_job(job), flush=True)
    return EXIT_OK


def run_result(client: Client, args: argparse.Namespace) -> int:
    args.current_job = args.job
    job = client.get(args.job) if args.no_wait else wait_for(client, args, args.job)
    return save_result(client, args, job)


def run_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel(args.job)
    if args.json:
        print_json(job_json(job))
    elif job.status is JobStatus.CANCELED:
        print(f"{job.id}: canceled", flush=True)
    else:
        print(f"{job.id}: cancel requested; it stops at its next denoising step", flush=True)
    return EXIT_OK


def run_events(client: Client, args: argparse.Namespace) -> int:
    final: Job | None = None
    for event in client.events(args.job, last_event_id=args.last_event_id, timeout=args.timeout):
        if args.json:
            print_json({"id": event.id, "event": event.type, "data": event.data})
        else:
            print(describe_event(event), flush=True)
        final = event.job
    if final is None:  # resumed after the final event: nothing came, the job says how it ended
        final = client.get(args.job)
    if final.status is JobStatus.FAILED:
        return EXIT_FAILED
    if final.status is JobStatus.CANCELED:
        return EXIT_CANCELED
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The `dreamomni2` argument parser."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="dreamomni2",
        description="Edit and generate images with a DreamOmni2 service, and follow its jobs.",
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, usage: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help, description=help, usage=usage, epilog=EXIT_CODES_HELP, formatter_class=formatter
        )
        add_common(sub, suppress=True)
        return sub

    edit = command(
        "edit",
        "Edit image 1 as the instruction says (images 2.. are references); save the result.",
        "dreamomni2 edit [options] IMAGE [REF ...] INSTRUCTION",
    )
    edit.add_argument("image", type=existing_file, metavar="IMAGE", help="image 1, the image to edit")
    edit.add_argument(
        "rest", nargs="+", metavar="REF ... INSTRUCTION", help="reference images, then the instruction"
    )
    add_job_options(edit, generation=False)
    edit.set_defaults(run=lambda client, args: run_submit(client, args, Task.EDIT))

    generate = command(
        "generate",
        "Generate an image as the instruction says (any images are references); save it.",
        "dreamomni2 generate [options] [REF ...] INSTRUCTION",
    )
    generate.add_argument(
        "rest", nargs="+", metavar="[REF ...] INSTRUCTION", help="references, then the instruction"
    )
    add_job_options(generate, generation=True)
    generate.set_defaults(run=lambda client, args: run_submit(client, args, Task.GENERATE))

    mix = command(
        "mix",
        "Make a Feature Mixing pair: a source image, and a target that takes the source's attribute "
        "(a material, a pose, a hairstyle, a style, an object); save both.",
        "dreamomni2 mix [options] SOURCE_PROMPT TARGET_PROMPT",
    )
    mix.add_argument("source_prompt", metavar="SOURCE_PROMPT", help="the image that has the attribute")
    mix.add_argument("target_prompt", metavar="TARGET_PROMPT", help="the image that takes it")
    mix.add_argument(
        "--attribute", metavar="LABEL", help="what the pair shares, kept with the job (material)"
    )
    add_job_options(mix, generation=True, mixing=True)
    add_mixing_options(mix.add_argument_group("mixing options"))
    mix.set_defaults(run=run_mix)

    dataset = command(
        "dataset",
        'Make a Feature Mixing dataset: one pair per line of PROMPTS ({"attribute", "source_prompt", '
        '"target_prompt", "seed"} JSON lines; blank lines and # comments skipped) into '
        "OUT_DIR/<pair id>/source.<format> and target.<format>, each finished pair appended to "
        "OUT_DIR/manifest.jsonl. Rerun the same command to resume: pairs in the manifest are skipped, "
        "pairs submitted before are picked up (the same job, by an Idempotency-Key from the pair id), "
        "failed ones submitted afresh. Options apply to every line; a line's seed overrides --seed; "
        "--timeout is each pair's.",
        "dreamomni2 dataset [options] PROMPTS.jsonl OUT_DIR",
    )
    dataset.add_argument("prompts", type=existing_file, metavar="PROMPTS.jsonl", help="the prompt pairs")
    dataset.add_argument("out_dir", metavar="OUT_DIR", help="where the pairs and manifest.jsonl go")
    dataset.add_argument(
        "--concurrency", type=positive_int, default=4, metavar="N", help="pairs in flight at once (4)"
    )
    dataset_options = dataset.add_argument_group("job options (every line)")
    add_sampling_options(dataset_options, True, "seed of the lines without one (default: random per pair)")
    add_mixing_options(dataset_options)
    dataset.set_defaults(run=run_dataset)

    add_bench_command(command("bench", BENCH_HELP, "dreamomni2 bench [options] BENCH_DIR OUT_DIR"))
    add_prompts_command(command("prompts", PROMPTS_HELP, "dreamomni2 prompts [options] ATTRIBUTES.txt"))

    status = command("status", "Print a job's status, progress, result or error.")
    status.add_argument("job", metavar="JOB", help="the job id (j_...)")
    status.set_defaults(run=run_status)

    result = command("result", "Save a job's result image (waiting for the job unless --no-wait).")
    result.add_argument("job", metavar="JOB", help="the job id (j_...)")
    result.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="where ('-': stdout; default <job id>.<format>; a Feature Mixing pair: as `mix -o`)",
    )
    result.add_argument(
        "--no-wait", action="store_true", help=f"do not wait: exit {EXIT_REFUSED} if not finished"
    )
    result.set_defaults(run=run_result)

    cancel = command("cancel", "Cancel a job: a queued one never runs, a running one stops at its next step.")
    cancel.add_argument("job", metavar="JOB", help="the job id (j_...)")
    cancel.set_defaults(run=run_cancel)

    events = command(
        "events", "Print a job's events as they happen, until it ends (exit 0, 6 or 7 as it ended)."
    )
    events.add_argument("job", metavar="JOB", help="the job id (j_...)")
    events.add_argument("--last-event-id", metavar="ID", help="resume after this event id")
    events.set_defaults(run=run_events)
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check itself; exits 2 like argparse."""
    if args.command in ("edit", "generate"):
        # The references share `rest` with the instruction (the last), so argparse cannot type them.
        for image in args.rest[:-1]:
            try:
                existing_file(image)
            except argparse.ArgumentTypeError as exc:
                parser.error(str(exc))
    if getattr(args, "output", None) == "-" and args.json:
        parser.error("-o - writes the image to stdout, where --json also writes: choose one")
    if (getattr(args, "num_images", None) or 1) > 1 and getattr(args, "output", None) == "-":
        parser.error("several images (-n) cannot all go to -o -: give a file name (out.png)")
    if args.command == "mix" and args.output == "-":
        parser.error("a pair is two images; -o - cannot hold both: give a file name (out.png)")


def report(error: DreamOmni2Error, args: argparse.Namespace) -> int:
    """Print an error for a person (stderr) and, with --json, for a program (stdout)."""
    say(f"dreamomni2: {error}")
    if isinstance(error, JobError):
        job = error.job
        if not args.quiet:
            say(f"{job.id}: {job.status.value}")
        if args.json:
            print_json(job_json(job))
    elif args.json:
        print_json({"error": {"code": error.code, "message": error.message, "status": error.status,
                              "details": error.details}})  # fmt: skip
    return exit_code(error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see `dreamomni2 --help`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    args.current_job = None
    run: Callable[[Client, argparse.Namespace], int] = args.run
    try:
        with Client(args.server, args.api_key) as client:
            return run(client, args)
    except DreamOmni2Error as error:
        return report(error, args)
    except KeyboardInterrupt:
        if args.current_job:
            say(f"\ninterrupted; job {args.current_job} goes on: dreamomni2 status {args.current_job}")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`dreamomni2 events JOB | head -1`): stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as error:
        say(f"dreamomni2: {error}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

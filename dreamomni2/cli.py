"""The `dreamomni2` command: edit and generate images with the service, and look after jobs.

    dreamomni2 edit bag.png dress.png "make the bag in image 1 use the pattern of image 2" -o out.png
    dreamomni2 generate style.png "a portrait in the style of image 1" --seed 7 -o portrait.png
    dreamomni2 mix "a woven straw hat" "a teapot" --attribute material -o hat.png  # hat-source/-target.png
    dreamomni2 dataset prompts.jsonl pairs/ --concurrency 4  # a Feature Mixing dataset, resumable
    dreamomni2 status JOB | result JOB -o out.png | cancel JOB | events JOB

Progress goes to stderr (a bar on a terminal, plain lines otherwise); results go to stdout (the file
written, or with --json the job object), so the output pipes into other tools.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from api_schemas.api import Job, JobStatus, OutputFormat
from api_schemas.common import MixBlocks, StepCache, Task, WebhookEvent
from dreamomni2._core import API_KEY_ENV, DEFAULT_SERVER, SERVER_ENV, __version__
from dreamomni2.aio import AsyncClient
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
    AuthenticationError,
    ConflictError,
    DreamOmni2Error,
    InvalidInputError,
    JobCanceledError,
    JobError,
    JobFailedError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    WaitTimeoutError,
)
from dreamomni2.events import JobEvent, JobProgress

# Exit codes: one per kind of outcome a script may branch on.
EXIT_OK = 0
EXIT_ERROR = 1  # anything else: an unexpected server error (500), a local I/O error
EXIT_USAGE = 2  # argparse's own: bad arguments, a missing input file
EXIT_REFUSED = 3
EXIT_AUTH = 4
EXIT_NOT_FOUND = 5
EXIT_FAILED = 6
EXIT_CANCELED = 7
EXIT_UNAVAILABLE = 8
EXIT_TIMEOUT = 9
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}    done: the image is saved, or the job's status, events or cancel were answered
  {EXIT_ERROR}    another error (an unexpected server error, a file that cannot be written)
  {EXIT_USAGE}    bad arguments, or an input image that cannot be read
  {EXIT_REFUSED}    the service refused the request: invalid input (too many images, steps out of range,
       a bad image, ...) or a job in the wrong state (no result yet, already finished)
  {EXIT_AUTH}    the API key is missing or not accepted
  {EXIT_NOT_FOUND}    no such job (unknown id, another key's job, or expired)
  {EXIT_FAILED}    the job failed (the message says why); dataset: some pairs failed (the summary lists them)
  {EXIT_CANCELED}    the job was canceled (by request or by its deadline)
  {EXIT_UNAVAILABLE}    the service is unreachable or unavailable (connection refused, 503, 429)
  {EXIT_TIMEOUT}    --timeout passed before the job ended (it goes on)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); the job goes on

environment:
  {SERVER_ENV}   the service's URL (default {DEFAULT_SERVER}, where `make up` serves)
  {API_KEY_ENV}  the API key, sent as `Authorization: Bearer <key>`
"""


def exit_code(error: DreamOmni2Error) -> int:
    """The exit code for an error (see EXIT_CODES_HELP)."""
    for kind, code in (
        (JobFailedError, EXIT_FAILED),
        (JobCanceledError, EXIT_CANCELED),
        (WaitTimeoutError, EXIT_TIMEOUT),
        (InvalidInputError, EXIT_REFUSED),
        (ConflictError, EXIT_REFUSED),
        (AuthenticationError, EXIT_AUTH),
        (NotFoundError, EXIT_NOT_FOUND),
        (ServiceUnavailableError, EXIT_UNAVAILABLE),
        (RateLimitError, EXIT_UNAVAILABLE),
    ):
        if isinstance(error, kind):
            return code
    return EXIT_ERROR


# Progress -------------------------------------------------------------------------------------------------
class TerminalProgress:
    """A progress bar on a terminal: the queue position while queued, then each stage's steps n/N."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._bar: tqdm | None = None
        self._phase: tuple[str, int] | None = None

    def __call__(self, progress: JobProgress) -> None:
        if progress.status is JobStatus.QUEUED:
            self._phase_bar(("queued", 0), None, "{desc} [{elapsed}]").set_description_str(
                progress.describe()
            )
        elif progress.status is JobStatus.RUNNING and progress.stage:
            bar = self._phase_bar((progress.stage, progress.total), progress.total, None)
            bar.update(progress.step - bar.n)
        elif progress.status is JobStatus.RUNNING:
            self._phase_bar(("started", 0), None, "{desc} [{elapsed}]")
        else:
            self.close()

    def _phase_bar(self, phase: tuple[str, int], total: int | None, bar_format: str | None) -> tqdm:
        """The bar of this phase (a status, or a stage and its step count): a new one when it changes."""
        if phase == self._phase and self._bar is not None:
            return self._bar
        self.close()
        self._phase = phase
        stage = phase[0]
        # The denoising bar stays on screen when done; the short phases make way for the next.
        self._bar = tqdm(
            total=total,
            desc=stage,
            unit="step",
            leave=stage == "denoise",
            file=self._file,
            dynamic_ncols=True,
            bar_format=bar_format,
        )
        return self._bar

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LineProgress:
    """Progress as plain lines, for logs and pipes: each change of state, and steps in tenths."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._last: object = None

    def __call__(self, progress: JobProgress) -> None:
        if progress.status.is_terminal():
            return  # the command reports the outcome
        if progress.status is JobStatus.RUNNING and progress.stage and progress.total > 1:
            # A line per tenth of the steps (and the last), not one per step: 30..5000 steps.
            key: object = (progress.stage, progress.step * 10 // progress.total)
        else:
            key = progress.describe()
        if key == self._last:
            return
        self._last = key
        print(f"{progress.job_id}: {progress.describe()}", file=self._file, flush=True)

    def close(self) -> None:
        pass


ProgressDisplay = TerminalProgress | LineProgress


def progress_display(args: argparse.Namespace) -> ProgressDisplay | None:
    if args.quiet:
        return None
    return TerminalProgress(sys.stderr) if sys.stderr.isatty() else LineProgress(sys.stderr)


# Output ---------------------------------------------------------------------------------------------------
def say(message: str) -> None:
    """A message for the person at the terminal (stderr: stdout carries results)."""
    print(message, file=sys.stderr, flush=True)


def print_json(value: object) -> None:
    print(json.dumps(value, indent=None, separators=(",", ":")), flush=True)


def job_json(job: Job) -> dict[str, Any]:
    return job.model_dump(mode="json", by_alias=True)


def describe_job(job: Job) -> str:
    """A few human lines about a job."""
    progress = job.progress
    state = job.status.value
    if job.status is JobStatus.QUEUED and job.queue_position:
        state += f" (position {job.queue_position} in the queue)"
    elif job.status is JobStatus.RUNNING and progress.stage:
        state += f" ({progress.stage} {progress.step}/{progress.total})"
    lines = [
        f"job:         {job.id}",
        f"status:      {state}",
        f"task:        {job.task.value}, {job.image_count} image(s), adapter {job.adapter.value}",
    ]
    if job.task is Task.FEATURE_MIXING:
        mixing = ", ".join(f"{name} {value}" for name, value in (job.mixing or {}).items())
        lines += [
            f"source:      {job.source_prompt}",
            f"target:      {job.target_prompt}",
            f"attribute:   {job.attribute or '-'}",
            f"mixing:      {mixing}",
        ]
    else:
        lines.append(f"instruction: {job.instruction}")
    lines.append(f"steps:       {job.steps}, guidance {job.guidance:g}, seed {job.seed}")
    results = job.results or ([job.result] if job.result is not None else [])
    for index, result in enumerate(results):
        label = f"result {index}:" if len(results) > 1 else "result:"
        seed = f", seed {result.seed}" if len(results) > 1 and result.seed is not None else ""
        lines.append(
            f"{label:<13}{result.width}x{result.height} {result.content_type}, {result.bytes} bytes{seed}"
        )
    if job.error is not None:
        lines.append(f"error:       {job.error.code}: {job.error.message}")
    if job.timings and "total" in job.timings:
        lines.append(f"took:        {job.timings['total']:.2f} s")
    return "\n".join(lines)


def describe_event(event: JobEvent) -> str:
    """One line per event: its id (to resume after), type and data."""
    data = event.data
    if event.job is not None:
        detail = f"{event.job.error.code}: {event.job.error.message}" if event.job.error else ""
    elif event.type == "progress":
        detail = f"{data.get('stage')} {data.get('step')}/{data.get('total')}"
    else:
        detail = " ".join(f"{name}={value}" for name, value in data.items())
    return f"{event.id} {event.type} {detail}".rstrip()


# Commands -------------------------------------------------------------------------------------------------
def output_path(args: argparse.Namespace, job: Job) -> str:
    """-o as given, else `<job id>.<format>` in the current folder."""
    return args.output or f"{job.id}.{job.output_format.value}"


def result_paths(output: str | None, job: Job, roles: Sequence[str]) -> list[Path]:
    """Where a job's several images go, one per role: -o out.png -> out-<role>.png; -o DIR (an existing
    folder) -> DIR/<job id>-<role>.<format>; no -o -> <job id>-<role>.<format>."""
    fmt = job.output_format.value
    base = Path(output) if output else Path(f"{job.id}.{fmt}")
    if output and base.is_dir():
        base = base / f"{job.id}.{fmt}"
    suffix = base.suffix or f".{fmt}"
    return [base.with_name(f"{base.stem}-{role}{suffix}") for role in roles]


def pair_paths(output: str | None, job: Job) -> tuple[Path, Path]:
    """Where a Feature Mixing pair goes: -o out.png -> out-source.png and out-target.png (`result_paths`)."""
    source, target = result_paths(output, job, ("source", "target"))
    return source, target


def save_pair(client: Client, args: argparse.Namespace, job: Job) -> int:
    """Save both images of a Feature Mixing job (see `pair_paths`); print the two paths (or the job)."""
    return save_each(client, args, job, list(pair_paths(args.output, job)), "a pair of images")


def save_each(client: Client, args: argparse.Namespace, job: Job, paths: list[Path], what: str) -> int:
    """Save a job's several images to `paths`, in result order; print the paths (or the job)."""
    if args.output == "-":  # `result JOB -o -` of several (`mix` and `-n` refuse it up front)
        say(f"dreamomni2: job {job.id} is {what}; -o - cannot hold them all: give a file name")
        return EXIT_USAGE
    for index, path in enumerate(paths):
        client.download(job, path, index=index)
    if args.json:
        print_json(job_json(job))
    else:
        print("\n".join(map(str, paths)), flush=True)
    if not args.quiet:
        took = f" in {job.timings['total']:.2f} s" if job.timings and "total" in job.timings else ""
        result = job.result
        size = f" ({result.width}x{result.height} {job.output_format.value})" if result else ""
        saved = ", ".join(map(str, paths[:-1])) + f" and {paths[-1]}"
        say(f"{job.id}: succeeded{took}; saved {saved}{size}")
    return EXIT_OK


def save_result(client: Client, args: argparse.Namespace, job: Job) -> int:
    if job.task is Task.FEATURE_MIXING:
        return save_pair(client, args, job)
    if job.results is not None and len(job.results) > 1:
        # -o out.png -> out-0.png, out-1.png, ...: image i, sampled with seed + i.
        paths = result_paths(args.output, job, [str(n) for n in range(len(job.results))])
        return save_each(client, args, job, paths, f"{len(job.results)} images")
    data = client.result_bytes(job)
    target = output_path(args, job)
    if target == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        Path(target).write_bytes(data)
    if args.json:
        print_json(job_json(job))
    elif target != "-":
        print(target, flush=True)
    if not args.quiet:
        took = f" in {job.timings['total']:.2f} s" if job.timings and "total" in job.timings else ""
        where = "stdout" if target == "-" else target
        result = job.result
        size = f" ({result.width}x{result.height} {job.output_format.value})" if result else ""
        say(f"{job.id}: succeeded{took}; saved {where}{size}")
    return EXIT_OK


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


# Arguments ------------------------------------------------------------------------------------------------
def existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return value


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return number


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {value}")
    return number


def fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {value}")
    return number


def size(value: str) -> tuple[int, int]:
    width, x, height = value.lower().partition("x")
    if not x or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, like 1024x768: {value}")
    return int(width), int(height)


def webhook_events(value: str) -> list[str]:
    events = [part.strip() for part in value.split(",") if part.strip()]
    allowed = [event.value for event in WebhookEvent]
    unknown = [event for event in events if event not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown event(s) {', '.join(unknown)}; use {', '.join(allowed)}")
    return events


def add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every command takes, before or after its name.

    On the subcommands their defaults are suppressed, so that an option given before the command
    name is not reset by the subcommand's default.
    """

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("common options")
    group.add_argument(
        "--server",
        metavar="URL",
        default=default(None),
        help=f"the service (${SERVER_ENV}; {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--api-key", metavar="KEY", default=default(None), help=f"the API key (${API_KEY_ENV})"
    )
    group.add_argument(
        "--json", action="store_true", default=default(False), help="print the job (or events) as JSON"
    )
    group.add_argument("-q", "--quiet", action="store_true", default=default(False), help="no progress")
    group.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=default(None),
        help=f"stop waiting for the job after S seconds (exit {EXIT_TIMEOUT}; the job goes on)",
    )


def add_job_options(parser: argparse.ArgumentParser, generation: bool, mixing: bool = False) -> None:
    group = parser.add_argument_group("job options")
    if mixing:
        group.add_argument("-o", "--output", metavar="PATH", help="where to save the pair: -o out.png "
                           "saves out-source.png and out-target.png; -o DIR (a folder) saves "
                           "DIR/<job id>-source.<format>, ...; default <job id>-source.<format>, ...",
                           )  # fmt: skip
    else:
        group.add_argument("-o", "--output", metavar="PATH", help="where to save the image ('-': stdout; "
                           "default <job id>.<format>)")  # fmt: skip
    group.add_argument("--no-wait", action="store_true", help="print the job id (or job) and exit; no image")
    add_sampling_options(group, generation, "random seed (default: a random one, reported back)")
    if not mixing:
        group.add_argument(
            "--step-cache",
            choices=[c.value for c in StepCache],
            help="reuse work across steps (faster, lossy)",
        )
        group.add_argument(
            "--no-translate", action="store_true", help="sample with the instruction as is (no VLM rewrite)"
        )
        group.add_argument(
            "-n",
            "--num-images",
            type=int,
            metavar="N",
            help="sample N images (seeds seed, seed+1, ...; default 1); -o out.png saves out-0.png, "
            "out-1.png, ...",
        )
    add_delivery_options(group)


def add_sampling_options(group: argparse._ArgumentGroup, generation: bool, seed_help: str) -> None:
    group.add_argument("--seed", type=non_negative_int, help=seed_help)
    group.add_argument("--steps", type=int, help="denoising steps (default: the deployment's, 30)")
    group.add_argument("--guidance", type=float, help="guidance scale (default: the deployment's, 3.5)")
    if generation:
        group.add_argument("--size", type=size, metavar="WxH", help="output aspect, e.g. 1024x768 (~1 MP)")
    group.add_argument("--format", choices=[f.value for f in OutputFormat], help="image format (default png)")


def add_mixing_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--mix-blocks",
        choices=[b.value for b in MixBlocks],
        help="the transformer blocks that mix (default all; none: the target is a plain generation)",
    )
    group.add_argument(
        "--mix-steps", type=fraction, metavar="F", help="fraction of the denoising steps that mix, 0..1 (1)"
    )
    group.add_argument(
        "--mix-strength",
        type=fraction,
        metavar="F",
        help="how much the target attends to the source, 0..1 (1)",
    )


def add_delivery_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--webhook-url", metavar="URL", help="POST signed job events there")
    group.add_argument(
        "--webhook-events", type=webhook_events, metavar="E,E", help="started,progress,completed (completed)"
    )
    group.add_argument("--deadline", type=float, metavar="S", help="cancel it unrun if not started in S s")
    group.add_argument(
        "--idempotency-key", metavar="KEY", help="resubmitting with the same key: the same job"
    )


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

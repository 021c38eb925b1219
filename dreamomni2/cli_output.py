"""How the `dreamomni2` command shows jobs: progress on stderr, a job in a few lines, results saved."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from api_schemas.api import Job, JobStatus
from api_schemas.common import Task

# Exit codes: one per kind of outcome a script may branch on.
from dreamomni2.cli_common import EXIT_OK, EXIT_USAGE, job_json, print_json, say
from dreamomni2.client import Client
from dreamomni2.events import JobEvent, JobProgress


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
    elif job.task is Task.MIXING_PROMPTS:
        lines.append(f"attribute:   {job.attribute} ({job.count} pair(s))")
    else:
        lines.append(f"instruction: {job.instruction}")
    if job.task.writes_text:  # its result is JSON, not an image
        if job.output is not None:
            lines.append(f"output:      {job.output.model_dump_json(exclude={'task'})}")
    else:
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

"""Running the benchmark's cases through the API: bounded concurrency, idempotent, resumable."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from api_schemas.api import Job
from api_schemas.errors import ErrorCode
from dreamomni2.aio import AsyncClient
from dreamomni2.bench.discovery import BenchCase
from dreamomni2.bench.judging import failed_verdict
from dreamomni2.bench.results import BenchFolder, SamplingOptions, case_key
from dreamomni2.dataset import is_fatal
from dreamomni2.errors import DreamOmni2Error, InvalidInputError, JobError, NotFoundError
from dreamomni2.resumable import run_pool

#: Refusals of the options every case is sent with: every other case would meet them too, so the run
#: stops at the first (as `is_fatal` errors do) rather than failing each case in turn.
OPTION_REFUSALS = frozenset(
    code.value
    for code in (ErrorCode.INVALID_REQUEST, ErrorCode.INVALID_STEPS, ErrorCode.INVALID_GUIDANCE,
                 ErrorCode.INVALID_SEED, ErrorCode.INVALID_WIDTH, ErrorCode.INVALID_HEIGHT,
                 ErrorCode.INVALID_SIZE, ErrorCode.STEP_CACHE_NOT_ALLOWED)
)  # fmt: skip


def stops_the_run(error: BaseException) -> bool:
    """An error every other case would meet: a key refused, no service, the options refused."""
    return is_fatal(error) or (isinstance(error, InvalidInputError) and error.code in OPTION_REFUSALS)


class Judge(Protocol):
    """Scores a finished case: returns the `judge` member of its record (`judging.verdict_record`)."""

    async def __call__(self, case: BenchCase, output: Path, record: dict[str, Any]) -> dict[str, Any]: ...


@dataclass
class CaseOutcome:
    """What became of one case in this run: `succeeded` (a job ran, or a finished case was judged),
    `skipped` (finished before, nothing to do) or `failed` (`error` says why)."""

    case: BenchCase
    status: str
    record: dict[str, Any] | None = None
    error: DreamOmni2Error | OSError | None = None
    note: str = ""

    @property
    def message(self) -> str:
        return str(self.error) if self.error is not None else self.note


@dataclass
class BenchPlan:
    """What this run does: each case to run (with its key and, if only its judging is left, its
    record), and the cases that need nothing."""

    todo: list[tuple[BenchCase, str, dict[str, Any] | None]] = field(default_factory=list)
    outcomes: list[CaseOutcome] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


def needs_judging(record: dict[str, Any], judge: str) -> bool:
    """A finished case to judge with `judge` (`service` or `url`): never judged by that kind of judge,
    or its judge did not answer. An answer that could not be scored is an answer: kept, not asked again."""
    verdict = record.get("judge")
    return not isinstance(verdict, dict) or verdict.get("by") != judge or verdict.get("error") is not None


def plan_bench(
    cases: list[BenchCase], folder: BenchFolder, options: SamplingOptions, *, judge: str | None
) -> BenchPlan:
    """Which cases to run: not those finished before under the same options (unless only their
    judging by `judge`, if any, is left)."""
    plan = BenchPlan()
    for case in cases:
        key = case_key(case, options)
        record = folder.finished(case, key)
        if record is None:
            plan.todo.append((case, key, None))
        elif judge is not None and needs_judging(record, judge):
            plan.todo.append((case, key, record))
        else:
            plan.outcomes.append(CaseOutcome(case, "skipped", record, note="finished before"))
    return plan


def _seconds_between(job: Job) -> float | None:
    if job.finished_at is None:
        return None
    return round((job.finished_at - job.created_at).total_seconds(), 3)


def job_record(case: BenchCase, key: str, job: Job, output: str | None, run_id: str) -> dict[str, Any]:
    """The results.jsonl line of a case whose job ended (`output`: the saved file, relative to OUT_DIR)."""
    return {
        "case_id": case.case_id,
        "task": case.task.value,
        "category": case.category,
        "scope": case.scope,
        "image_count": case.image_count,
        "instruction": case.instruction,
        "images": [str(path.resolve()) for path in case.images],
        "case_key": key,
        "job_id": job.id,
        "status": job.status.value,
        "error": job.error.model_dump() if job.error is not None else None,
        "output": output,
        "prompt": job.prompt,
        "translated": job.translated,
        "seed": job.seed,
        "steps": job.steps,
        "guidance": job.guidance,
        "loras": [lora.model_dump(mode="json") for lora in job.loras],
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "latency_s": _seconds_between(job),
        "timings": job.timings or {},
        "run": run_id,
        "judge": None,
    }


def refused_record(
    case: BenchCase, key: str, error: DreamOmni2Error | OSError, run_id: str
) -> dict[str, Any]:
    """The results.jsonl line of a case that got no job (refused by the service, or unreadable)."""
    code = getattr(error, "code", None) or type(error).__name__
    return {
        "case_id": case.case_id, "task": case.task.value, "category": case.category, "scope": case.scope,
        "image_count": case.image_count, "instruction": case.instruction,
        "images": [str(path.resolve()) for path in case.images], "case_key": key, "job_id": None,
        "status": "failed", "error": {"code": code, "message": getattr(error, "message", str(error))},
        "output": None, "prompt": None, "translated": None, "seed": None, "steps": None, "guidance": None,
        "loras": [], "created_at": None, "finished_at": None, "latency_s": None, "timings": {}, "run": run_id,
        "judge": None,
    }  # fmt: skip


async def run_case(
    client: AsyncClient,
    case: BenchCase,
    key: str,
    folder: BenchFolder,
    options: SamplingOptions,
    *,
    idempotency_key: str,
    run_id: str,
    timeout: float | None = None,
) -> CaseOutcome:
    """Submit one case (or get its earlier job back), wait for it, save its output; the outcome.

    Raises the errors `stops_the_run` names; returns every other as a failed outcome with its record.
    """
    job_id = None
    try:
        job = await client.submit(**options.submit_arguments(case), idempotency_key=idempotency_key)
        job_id = job.id
        job = await client.wait(job, timeout=timeout)
        path = folder.output_path(case, job.output_format.value)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(await client.result_bytes(job))
    except (DreamOmni2Error, OSError) as error:
        if stops_the_run(error):
            raise
        if isinstance(error, JobError):
            record = job_record(case, key, error.job, None, run_id)
        else:
            record = refused_record(case, key, error, run_id)
            record["job_id"] = job_id
        if isinstance(error, JobError | NotFoundError) and job_id is not None:
            # The job is over without a usable result: the next run submits the case afresh.
            folder.add_failed_job({"case_id": case.case_id, "case_key": key, "job_id": job_id,
                                   "idempotency_key": idempotency_key, "code": getattr(error, "code", None),
                                   "message": str(error)})  # fmt: skip
        return CaseOutcome(case, "failed", record, error=error)
    output = path.relative_to(folder.root).as_posix()
    return CaseOutcome(case, "succeeded", job_record(case, key, job, output, run_id))


async def judge_case(judge: Judge, case: BenchCase, folder: BenchFolder, record: dict[str, Any]) -> None:
    """Ask the judge about a succeeded case; its verdict (or why there is none) goes into `record`."""
    try:
        record["judge"] = await judge(case, folder.root / record["output"], record)
    except (DreamOmni2Error, OSError) as error:
        # A deployment without the language model refuses every judge job alike: stop there.
        if is_fatal(error) or getattr(error, "code", None) == ErrorCode.TRANSLATOR_UNAVAILABLE.value:
            raise
        record["judge"] = failed_verdict(error)


async def run_bench(
    client: AsyncClient,
    plan: BenchPlan,
    folder: BenchFolder,
    options: SamplingOptions,
    *,
    concurrency: int = 4,
    timeout: float | None = None,
    judge: Judge | None = None,
    on_outcome: Callable[[CaseOutcome], object] | None = None,
) -> list[CaseOutcome]:
    """Run the plan's cases, at most `concurrency` at a time; each ended case goes into results.jsonl
    as it ends. Returns every case's outcome (the plan's own first).

    Raises the first error that stops the run (`stops_the_run`) once the cases in flight are stopped.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be 1 or more; got {concurrency}.")
    outcomes = list(plan.outcomes)
    failures = folder.failures()

    async def run(item: tuple[BenchCase, str, dict[str, Any] | None]) -> None:
        case, key, finished = item
        if finished is None:
            outcome = await run_case(client, case, key, folder, options, run_id=plan.run_id,
                                     idempotency_key=folder.idempotency_key(key, failures[key]),
                                     timeout=timeout)  # fmt: skip
        else:
            outcome = CaseOutcome(case, "succeeded", dict(finished), note="judged only")
        if judge is not None and outcome.status == "succeeded" and outcome.record is not None:
            await judge_case(judge, case, folder, outcome.record)
        if outcome.record is not None:
            folder.add(outcome.record)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    await run_pool(plan.todo, concurrency, run)
    return outcomes

"""`bench --judge`: each succeeded case is judged by a `task: "judge"` job of the same service (the
worker's VLM, its answer decoded under the verdict's JSON schema), and the verdict's record shape that
both judges (this one and `judge_client.ChatJudge`) write into results.jsonl.

A verdict record: `by` (`service` or `url`), `model` (the external model) or `job_id` (the judge
job), `scores` (criterion -> 1..5, or None when unscored), `reason`, `success` (every score above 3;
None when unscored), `unscored`, `raw` (the judge's answer as written) and `error` (why there is no
answer at all: the case is judged again by the next run; None otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api_schemas.common import Task
from api_schemas.text_tasks import JUDGE_CRITERIA, JudgeVerdict
from dreamomni2.aio import AsyncClient
from dreamomni2.bench.discovery import BenchCase
from dreamomni2.bench.results import BenchFolder
from dreamomni2.errors import DreamOmni2Error, JobError, NotFoundError, ServerError


def verdict_record(verdict: JudgeVerdict, raw: str | None, by: str, **extra: Any) -> dict[str, Any]:  # noqa: ANN401
    """The `judge` member of a case's record (see the module's docstring)."""
    scores = None if verdict.unscored else {name: getattr(verdict, name) for name in JUDGE_CRITERIA}
    return {
        "by": by,
        **extra,
        "scores": scores,
        "reason": verdict.reason,
        "success": None if verdict.unscored else verdict.success,
        "unscored": verdict.unscored,
        "raw": raw,
        "error": None,
    }


class ServiceJudge:
    """The service's own judge: one `judge` job per case (its inputs in order, then its output, and the
    instruction), submitted with an idempotency key of the case, so a rerun gets the same job back;
    a judge job that failed is logged in failed_jobs.jsonl and the next run submits a new one."""

    def __init__(self, client: AsyncClient, folder: BenchFolder, *, timeout: float | None = None) -> None:
        self._client = client
        self._folder = folder
        self._failures = folder.failures()
        self._timeout = timeout

    async def __call__(self, case: BenchCase, output: Path, record: dict[str, Any]) -> dict[str, Any]:
        """The verdict on one case; raises the client's error when the judge job gave none."""
        judge_key = f"judge-{record['case_key']}"
        key = self._folder.idempotency_key(judge_key, self._failures[judge_key])
        job = await self._client.submit(
            case.instruction, [*case.images, output], task=Task.JUDGE, idempotency_key=key
        )
        try:
            job = await self._client.wait(job, timeout=self._timeout)
        except (JobError, NotFoundError) as error:
            failed = {"case_id": case.case_id, "case_key": judge_key, "job_id": job.id, "key": key}
            self._folder.add_failed_job({**failed, "code": error.code, "message": str(error)})
            raise
        if not isinstance(job.output, JudgeVerdict):
            raise ServerError(f"judge job {job.id} succeeded without a verdict", code="invalid_event")
        seconds = (job.timings or {}).get("total")
        return verdict_record(job.output, job.output_raw, "service", job_id=job.id, seconds=seconds)


def failed_verdict(error: DreamOmni2Error | OSError) -> dict[str, Any]:
    """The `judge` member of a case whose judge gave no answer (judged again by the next run)."""
    return {
        "scores": None,
        "reason": None,
        "success": None,
        "unscored": None,
        "raw": None,
        "error": str(error),
    }

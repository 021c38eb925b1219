"""The job object as callers see it, built from the stored record (gateway responses and webhooks)."""

from __future__ import annotations

from datetime import UTC, datetime

from api_schemas.api import ErrorInfo, Job, JobLinks, JobStatus, Progress, ResultInfo, WebhookInfo
from workers.store import JobRecord


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


def job_view(record: JobRecord, queue_position: int | None = None) -> Job:
    spec, meta = record.spec, record.metadata or {}
    params = spec["params"]
    base = f"/v1/jobs/{record.id}"
    result = None
    if record.status is JobStatus.SUCCEEDED and record.result:
        result = ResultInfo(url=f"{base}/result", **record.result)
    webhook = None
    if spec.get("webhook"):
        webhook = WebhookInfo(**spec["webhook"], last_delivery=record.webhook)
    return Job(
        id=record.id,
        status=record.status,
        task=spec["task"],
        adapter=meta.get("adapter", spec["adapter"]),
        image_count=spec["image_count"],
        instruction=params["instruction"],
        prompt=meta.get("prompt"),
        translated=meta.get("translated"),
        fallback_reason=meta.get("fallback_reason"),
        seed=meta.get("seed", params.get("seed")),
        steps=params["steps"],
        guidance=params["guidance"],
        output_format=spec["output_format"],
        progress=Progress(**record.progress) if record.progress else Progress(),
        queue_position=queue_position if record.status is JobStatus.QUEUED else None,
        attempts=record.attempts,
        created_at=_time(record.created_at),
        started_at=_time(record.started_at),
        finished_at=_time(record.finished_at),
        timings=meta.get("timings"),
        error=ErrorInfo(**record.error) if record.error else None,
        result=result,
        cancel_requested=record.cancel_requested,
        cancel_reason=record.cancel_reason,
        deadline_at=_time(record.deadline_at),
        webhook=webhook,
        links=JobLinks(self_=base, result=f"{base}/result"),
    )

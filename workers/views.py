"""The job object as callers see it, built from the stored record (gateway responses and webhooks)."""

from __future__ import annotations

from datetime import UTC, datetime

from api_schemas.api import Job, JobLinks, JobStatus, ResultInfo, WebhookInfo
from api_schemas.common import Task
from api_schemas.records import JobRecord
from workers.result_links import ResultLinks


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


def _result(record: JobRecord, index: int, links: ResultLinks | None) -> ResultInfo:
    info = record.all_results[index]
    url = f"/v1/jobs/{record.id}/result" + (f"?index={index}" if index else "")
    if links is None:
        return ResultInfo(url=url, **info.model_dump())
    signed = links.link(record.id, index, since=record.finished_at or 0.0)
    return ResultInfo(
        url=url, signed_url=signed.url, signed_url_expires_at=signed.expires_at, **info.model_dump()
    )


def job_view(record: JobRecord, queue_position: int | None = None, links: ResultLinks | None = None) -> Job:
    """The job object; with `links`, each result also carries its signed link (no API key needed)."""
    spec, meta = record.spec, record.metadata
    params = spec.job
    base = f"/v1/jobs/{record.id}"
    results = None
    if record.status is JobStatus.SUCCEEDED and record.all_results:
        results = [_result(record, n, links) for n in range(len(record.all_results))]
    mixing = None
    if spec.task is Task.FEATURE_MIXING:
        # The spec's job is resolved: the mixing defaults are filled in at submission.
        mixing = (meta and meta.mixing) or {
            "blocks": params.mix_blocks,
            "step_fraction": params.mix_steps,
            "strength": params.mix_strength,
        }
    webhook = None
    if spec.webhook is not None:
        webhook = WebhookInfo(url=spec.webhook.url, events=spec.webhook.events, last_delivery=record.webhook)
    return Job(
        id=record.id,
        status=record.status,
        task=spec.task,
        adapter=meta.adapter if meta else spec.adapter,
        image_count=spec.image_count,
        instruction=params.instruction,
        source_prompt=params.source_prompt,
        target_prompt=params.target_prompt,
        attribute=params.attribute,
        count=params.count,
        mixing=mixing,
        prompt=meta.prompt if meta else None,
        translated=meta.translated if meta else None,
        fallback_reason=meta.fallback_reason if meta else None,
        seed=meta.seed if meta else params.seed,
        num_images=params.num_images,
        steps=params.steps,
        guidance=params.guidance,
        output_format=spec.output_format,
        step_cache=meta.step_cache if meta else params.step_cache,
        loras=meta.loras if meta else params.loras,
        speed_profile=meta.speed_profile if meta else None,
        transformer_evaluations=meta.transformer_evaluations if meta else None,
        progress=record.progress,
        queue_position=queue_position if record.status is JobStatus.QUEUED else None,
        attempts=record.attempts,
        created_at=_time(record.created_at),
        started_at=_time(record.started_at),
        finished_at=_time(record.finished_at),
        timings=meta.timings if meta else None,
        error=record.error,
        result=results[0] if results else None,
        results=results,
        output=meta.output if meta and record.status is JobStatus.SUCCEEDED else None,
        output_raw=meta.output_raw if meta and record.status is JobStatus.SUCCEEDED else None,
        cancel_requested=record.cancel_requested,
        cancel_reason=record.cancel_reason,
        deadline_at=_time(record.deadline_at),
        webhook=webhook,
        links=JobLinks(self_=base, result=f"{base}/result"),
    )

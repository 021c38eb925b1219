"""The jobs service: everything behind the routes. Checks a request fully before anything is queued."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from dataclasses import dataclass

from celery import Celery

from api_schemas.api import Job, JobOptions, JobStatus, WebhookEventName
from api_schemas.errors import Conflict, InvalidInput, PayloadTooLarge
from api_schemas.images import check_byte_size, load_image
from api_schemas.jobs import JobParameters, resolve_job
from app.metrics import GatewayMetrics
from app.settings import GatewaySettings
from workers.celery_app import enqueue
from workers.store import JobRecord, JobStore
from workers.views import job_view
from workers.webhooks import Notifier, WebhookDeliverer, WebhookEvent, check_destination

logger = logging.getLogger(__name__)

_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*);base64,", re.ASCII)


@dataclass
class Submission:
    """A parsed request: images as bytes in order, the options, and header-borne settings."""

    images: list[bytes]
    options: JobOptions
    cancel_after_s: float | None = None


def decode_data_uri(uri: str, label: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,` URI; 413 when over `max_bytes`."""
    match = _DATA_URI.match(uri)
    if not match:
        raise InvalidInput(
            f"{label} must be a data URI like `data:image/png;base64,...`.",
            code="invalid_image",
            details={"image": label},
        )
    payload = uri[match.end() :]
    # Base64 carries 3 bytes per 4 characters: refuse before decoding something far too large.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise PayloadTooLarge(
            f"{label} is about {len(payload) * 3 // 4} bytes; the limit is {max_bytes} bytes.",
            code="image_file_too_large",
            details={"image": label, "max_bytes": max_bytes},
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            f"{label} is not valid base64 after `;base64,`.", code="invalid_image", details={"image": label}
        ) from None


def request_fingerprint(spec: dict, images: list[bytes], deadline_s: float | None) -> str:
    """What makes two submissions "the same request" for Idempotency-Key, whatever their encoding."""
    digest = hashlib.sha256(json.dumps({"spec": spec, "deadline_s": deadline_s}, sort_keys=True).encode())
    for data in images:
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


class JobService:
    def __init__(self, settings: GatewaySettings, store: JobStore, celery: Celery, metrics: GatewayMetrics):
        self.settings = settings
        self.limits = settings.limits
        self.store = store
        self.celery = celery
        self.metrics = metrics
        self.notifier = Notifier(store, celery, settings)
        self.webhooks = WebhookDeliverer(store, settings)

    # Submit -----------------------------------------------------------------------------------------
    def check(self, owner: str, submission: Submission) -> tuple[dict, list[bytes]]:
        """Validate everything a worker would refuse, in the order a person would fix it."""
        options = submission.options
        images = submission.images
        image_limits = self.limits.image_limits()
        for n, data in enumerate(images, start=1):
            check_byte_size(data, image_limits, f"image {n}")
        params = JobParameters.model_validate(options.model_dump(include=set(JobParameters.model_fields)))
        job = resolve_job(params, len(images), self.limits)
        for n, data in enumerate(images, start=1):
            load_image(data, limits=image_limits, label=f"image {n}")
        spec = {
            "params": job.parameters().model_dump(mode="json"),
            "task": job.task.value,
            "adapter": job.adapter.value,
            "image_count": job.image_count,
            "output_format": options.output_format.value,
        }
        ttl_s = self.settings.job_ttl_s
        deadlines = (("deadline_s", options.deadline_s), ("Cancel-After", submission.cancel_after_s))
        for name, seconds in deadlines:
            # Also keeps inf and huge values out: they would be stored, then fail to render (a 500).
            if seconds is not None and not seconds <= ttl_s:
                raise InvalidInput(
                    f"{name} must be at most {ttl_s} seconds (the job's lifetime); got {seconds}.",
                    code="invalid_request",
                    details={"field": name, "max": ttl_s},
                )
        if options.webhook_url is not None:
            spec["webhook"] = self.check_webhook(owner, options)
        elif options.webhook_events:
            raise InvalidInput("webhook_events needs a webhook_url.", code="invalid_request")
        return spec, images

    def check_webhook(self, owner: str, options: JobOptions) -> dict:
        if self.webhooks.secret_for(owner) is None:
            raise InvalidInput(
                "Webhooks are not configured on this deployment (no signing secret); poll the job or use "
                "its event stream instead.",
                code="webhooks_unavailable",
            )
        check_destination(options.webhook_url, self.webhooks.allowlist)
        events = sorted({e.value for e in options.webhook_events or [WebhookEventName.COMPLETED]})
        return {"url": options.webhook_url, "events": events}

    def submit(
        self, owner: str, submission: Submission, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Queue a checked job; returns it and whether it is the replay of an earlier request."""
        try:
            spec, images = self.check(owner, submission)
        except InvalidInput as exc:
            self.metrics.jobs_rejected.labels(exc.code).inc()
            raise
        deadlines = [s for s in (submission.options.deadline_s, submission.cancel_after_s) if s is not None]
        deadline_s = min(deadlines) if deadlines else None
        ttl_s = self.settings.job_ttl_s
        fingerprint = ""
        if idempotency_key is not None:
            fingerprint = request_fingerprint(spec, images, deadline_s)
            existing = self.store.reserve_idempotency_key(owner, idempotency_key, fingerprint, ttl_s)
            if existing is not None:
                return self.store.get(existing, owner), True
        try:
            record = self.store.create(
                owner=owner, spec=spec, images=images, ttl_s=ttl_s, deadline_s=deadline_s
            )
        except Exception:
            if idempotency_key is not None:
                self.store.release_idempotency_key(owner, idempotency_key)
            raise
        if idempotency_key is not None:
            self.store.complete_idempotency_key(owner, idempotency_key, fingerprint, record.id, ttl_s)
        try:
            enqueue(self.celery, self.settings, record.id)
        except Exception as exc:
            logger.error("could not enqueue job %s: %s", record.id, exc)
            self.store.fail_unsent(record.id, "The job queue is unreachable; the job was not queued.")
            raise
        self.metrics.jobs_submitted.labels(spec["task"], spec["adapter"]).inc()
        return record, False

    def cancel(self, owner: str, job_id: str) -> tuple[JobRecord, bool]:
        """Cancel a job; returns it and whether the cancel is still under way (it was running)."""
        self.store.get(job_id, owner)
        outcome = self.store.cancel(job_id)
        if outcome == "dequeued":
            self.notifier.notify(job_id, WebhookEvent.COMPLETED)
        elif outcome != "cancel_requested":
            raise Conflict(
                f"Job {job_id} already {outcome}; only queued or running jobs can be canceled.",
                code="job_finished",
                details={"status": outcome},
            )
        return self.store.get(job_id), outcome == "cancel_requested"

    def expire_deadlines(self) -> int:
        """Cancel queued jobs past their deadline (any gateway replica may run this; it is atomic)."""
        expired = 0
        for job_id in self.store.due_deadlines():
            if self.store.expire_deadline(job_id):
                expired += 1
                self.notifier.notify(job_id, WebhookEvent.COMPLETED)
        return expired

    # Read -------------------------------------------------------------------------------------------
    def get(self, owner: str, job_id: str) -> JobRecord:
        return self.store.get(job_id, owner)

    def wait(self, record: JobRecord, seconds: float) -> JobRecord:
        if seconds <= 0 or record.status.is_terminal():
            return record
        return self.store.wait_until_terminal(record.id, min(seconds, self.settings.max_wait_s))

    def result(self, owner: str, job_id: str) -> tuple[bytes, str]:
        record = self.store.get(job_id, owner)
        if record.status is JobStatus.SUCCEEDED:
            data = self.store.result(job_id)
            if data is not None and record.result:
                return data, record.result["content_type"]
        if record.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise Conflict(
                f"Job {job_id} is {record.status.value}; the result is ready once its status is succeeded.",
                code="job_not_finished",
                details={"status": record.status.value},
            )
        reason = (record.error or {}).get("message", "")
        raise Conflict(
            f"Job {job_id} is {record.status.value} and has no result. {reason}".strip(),
            code=f"job_{record.status.value}",
            details={"status": record.status.value},
        )

    def render(self, record: JobRecord) -> Job:
        """The job object as the API shows it."""
        position = self.store.queue_position(record.id) if record.status is JobStatus.QUEUED else None
        return job_view(record, position)

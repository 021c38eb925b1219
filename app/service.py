"""The jobs service: everything behind the routes. Checks a request fully before anything is queued."""

from __future__ import annotations

import base64
import binascii
import logging
import re
from dataclasses import dataclass

from celery import Celery
from pydantic import ValidationError

from api_schemas.api import Job, JobStatus, OutputFormat
from api_schemas.errors import Conflict, InvalidInput, PayloadTooLarge
from api_schemas.images import check_byte_size, load_image
from api_schemas.jobs import JobParameters, resolve_job
from app.metrics import GatewayMetrics
from app.settings import GatewaySettings
from workers.celery_app import enqueue
from workers.store import JobRecord, JobStore
from workers.views import job_view

logger = logging.getLogger(__name__)

_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*);base64,", re.ASCII)


@dataclass
class Submission:
    """A request as received, before checking: images as bytes in order, the other fields as sent."""

    images: list[bytes]
    fields: dict[str, object]


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


class JobService:
    def __init__(self, settings: GatewaySettings, store: JobStore, celery: Celery, metrics: GatewayMetrics):
        self.settings = settings
        self.limits = settings.limits
        self.store = store
        self.celery = celery
        self.metrics = metrics

    # Submit -----------------------------------------------------------------------------------------
    def check(self, submission: Submission) -> tuple[dict, list[bytes]]:
        """Validate everything a worker would refuse, in the order a person would fix it."""
        fields = dict(submission.fields)
        output_format = fields.pop("output_format", None) or OutputFormat.PNG
        try:
            output_format = OutputFormat(output_format)
        except ValueError:
            raise InvalidInput(
                f"output_format must be one of png, jpeg, webp; got {output_format!r}.",
                code="invalid_output_format",
            ) from None
        try:
            params = JobParameters.model_validate(fields)
        except ValidationError as exc:
            problems = [
                {"field": ".".join(map(str, e["loc"])) or "body", "problem": e["msg"]} for e in exc.errors()
            ]
            summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
            raise InvalidInput(
                f"The request is invalid: {summary}.", code="invalid_request", details={"errors": problems}
            ) from None
        images = submission.images
        image_limits = self.limits.image_limits()
        for n, data in enumerate(images, start=1):
            check_byte_size(data, image_limits, f"image {n}")
        job = resolve_job(params, len(images), self.limits)
        for n, data in enumerate(images, start=1):
            load_image(data, limits=image_limits, label=f"image {n}")
        spec = {
            "params": JobParameters(
                instruction=job.instruction,
                task=job.task,
                seed=job.seed,
                steps=job.steps,
                guidance=job.guidance,
                width=job.width,
                height=job.height,
                translate=job.translate,
            ).model_dump(mode="json"),
            "task": job.task.value,
            "adapter": job.adapter.value,
            "image_count": job.image_count,
            "output_format": output_format.value,
        }
        return spec, images

    def submit(self, owner: str, submission: Submission) -> JobRecord:
        try:
            spec, images = self.check(submission)
        except InvalidInput as exc:
            self.metrics.jobs_rejected.labels(exc.code).inc()
            raise
        record = self.store.create(owner=owner, spec=spec, images=images, ttl_s=self.settings.job_ttl_s)
        try:
            enqueue(self.celery, self.settings, record.id)
        except Exception as exc:
            logger.error("could not enqueue job %s: %s", record.id, exc)
            self.store.fail_unsent(record.id, "The job queue is unreachable; the job was not queued.")
            raise
        self.metrics.jobs_submitted.labels(spec["task"], spec["adapter"]).inc()
        return record

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

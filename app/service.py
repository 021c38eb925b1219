"""The jobs service: everything behind the routes. Checks a request fully before anything is queued.

The store reports what happened (`workers.store.outcomes`); this is where those outcomes become the
API's errors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis
import redis.asyncio
from celery import Celery
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from api_schemas.api import Job, JobOptions, JobStatus
from api_schemas.common import Task, WebhookEvent
from api_schemas.errors import (
    Conflict,
    ErrorCode,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
    TranslatorUnavailable,
)
from api_schemas.images import check_byte_size, load_image
from api_schemas.jobs import JobParameters, resolve_job
from api_schemas.records import JobRecord, JobSpec, WebhookSpec
from app.events import job_events, stream_ended
from app.metrics import GatewayMetrics
from app.request_id import current_request_id
from app.settings import GatewaySettings
from workers import tracing
from workers.celery_app import enqueue
from workers.destinations import check_destination
from workers.logs import log_context
from workers.result_links import ResultLinks, ResultLinkSigner
from workers.store import CancelOutcome, DiscardOutcome, Reservation, Store
from workers.store.jobs import new_job_id
from workers.store.quotas import Limits, Refusal
from workers.views import job_view
from workers.webhooks import Notifier, WebhookDeliverer

logger = logging.getLogger(__name__)

#: Longest a submission waits for its job's write to reach DREAMOMNI2_REDIS_MIN_REPLICAS replicas: a
#: replica that is connected acknowledges within milliseconds.
REPLICA_WAIT_MS = 1000


@dataclass
class Submission:
    """A parsed request: images as bytes in order, the options, and header-borne settings."""

    images: list[bytes]
    options: JobOptions
    cancel_after_s: float | None = None


def request_fingerprint(spec: JobSpec, images: list[bytes], deadline_s: float | None) -> str:
    """What makes two submissions "the same request" for Idempotency-Key, whatever their encoding."""
    payload = {"spec": spec.model_dump(mode="json"), "deadline_s": deadline_s}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    for data in images:
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def _not_found(job_id: str) -> NotFound:
    # One answer for a missing job and another key's: other keys' ids are not even confirmed to exist.
    return NotFound(f"No job {job_id!r}: it does not exist or has expired.", code=ErrorCode.JOB_NOT_FOUND)


class JobService:
    def __init__(self, settings: GatewaySettings, store: Store, celery: Celery, metrics: GatewayMetrics):
        self.settings = settings
        self.limits = settings.limits
        self.store = store
        self.celery = celery
        self.metrics = metrics
        self.notifier = Notifier(store, celery, settings)
        self.webhooks = WebhookDeliverer(store, settings)
        self.result_links = ResultLinkSigner.from_settings(settings)
        if not self.result_links.keyed:
            logger.warning(
                "DREAMOMNI2_RESULT_URL_SECRET is not set: result links are signed with a key anyone can "
                "derive, which is only fine while API keys are off (every result is public then)."
            )
        #: The async Redis client of the event streams, opened by the app's lifespan.
        self.aredis: redis.asyncio.Redis | None = None

    # Submit -----------------------------------------------------------------------------------------
    def check(self, owner: str, submission: Submission) -> JobSpec:
        """Validate everything a worker would refuse, in the order a person would fix it."""
        options, images = submission.options, submission.images
        image_limits = self.limits.image_limits()
        for n, data in enumerate(images, start=1):
            check_byte_size(data, image_limits, f"image {n}")
        params = JobParameters.model_validate(options.model_dump(include=set(JobParameters.model_fields)))
        job = resolve_job(params, len(images), self.limits)
        if job.task.writes_text:
            self.require_translator(job.task)
        for n, data in enumerate(images, start=1):
            load_image(data, limits=image_limits, label=f"image {n}")
        ttl_s = self.settings.job_ttl_s
        for name, seconds in (
            ("deadline_s", options.deadline_s),
            ("Cancel-After", submission.cancel_after_s),
        ):
            # Also keeps inf and huge values out: they would be stored, then fail to render (a 500).
            if seconds is not None and not seconds <= ttl_s:
                raise InvalidInput(
                    f"{name} must be at most {ttl_s} seconds (the job's lifetime); got {seconds}.",
                    code=ErrorCode.INVALID_REQUEST,
                    details={"field": name, "max": ttl_s},
                )
        webhook = None
        if options.webhook_url is not None:
            webhook = self.check_webhook(owner, options)
        elif options.webhook_events:
            raise InvalidInput("webhook_events needs a webhook_url.", code=ErrorCode.INVALID_REQUEST)
        return JobSpec(job=job, output_format=options.output_format, webhook=webhook)

    def require_translator(self, task: Task) -> None:
        """Refuse a text task when every ready worker runs without the language model; with none ready
        yet the job is queued (a worker without the model fails it with the same code)."""
        ready = [w for w in self.store.workers.workers() if w.get("ready")]
        if ready and not any(w.get("translator") for w in ready):
            raise TranslatorUnavailable(
                f"task={task.value} needs the workers' language model, and this deployment runs without "
                "it (DREAMOMNI2_TRANSLATOR=false); use a deployment with the translator on.",
                details={"task": task.value},
            )

    def check_webhook(self, owner: str, options: JobOptions) -> WebhookSpec:
        if self.webhooks.secret_for(owner) is None:
            raise InvalidInput(
                "Webhooks are not configured on this deployment (no signing secret); poll the job or use "
                "its event stream instead.",
                code=ErrorCode.WEBHOOKS_UNAVAILABLE,
            )
        check_destination(options.webhook_url, self.webhooks.allowlist)
        events = sorted(set(options.webhook_events or [WebhookEvent.COMPLETED]))
        return WebhookSpec(url=options.webhook_url, events=events)

    def submit(
        self, owner: str, submission: Submission, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Queue a checked job; returns it and whether it is the replay of an earlier request."""
        try:
            spec = self.check(owner, submission)
        except InvalidInput as exc:
            self.metrics.jobs_rejected.labels(exc.code.value).inc()
            raise
        images = submission.images
        deadlines = [s for s in (submission.options.deadline_s, submission.cancel_after_s) if s is not None]
        deadline_s = min(deadlines) if deadlines else None
        ttl_s = self.settings.job_ttl_s
        fingerprint = ""
        if idempotency_key is not None:
            fingerprint = request_fingerprint(spec, images, deadline_s)
            replay = self._reserve(owner, idempotency_key, fingerprint)
            if replay is not None:
                return replay, True
        job_id = new_job_id()

        def record_key(pipe: redis.client.Pipeline, job_id: str) -> None:
            if idempotency_key is not None:
                self.store.idempotency.complete(owner, idempotency_key, fingerprint, job_id, ttl_s, pipe)

        try:
            self._admit(owner, job_id)
            record = self.store.jobs.create(
                owner=owner,
                spec=spec,
                images=images,
                ttl_s=ttl_s,
                deadline_s=deadline_s,
                job_id=job_id,
                also=record_key,
                request_id=current_request_id(),
                traceparent=tracing.current_traceparent(),
            )
        except Exception:
            if idempotency_key is not None:
                self.store.idempotency.release(owner, idempotency_key)
            self.store.quotas.release(owner, job_id)
            raise
        if self.settings.redis_min_replicas:
            self._replicate(owner, job_id, idempotency_key)
        # From here on the job exists: whatever fails now, the answer is the job, never a 5xx that a
        # client would retry into a duplicate. The stored job is the truth: a worker's reaper sends a
        # new message for a queued job that has none.
        self.metrics.jobs_submitted.labels(spec.task.value, spec.adapter.value).inc()
        tracing.annotate(tracing.job_attributes(record))
        with log_context(job_id=record.id):
            logger.info(
                "job %s queued: %s, adapter %s, %d image(s)",
                record.id,
                spec.task.value,
                spec.adapter.value,
                spec.image_count,
            )
            try:
                enqueue(self.celery, self.settings, record.id)
            except Exception as exc:
                logger.warning(
                    "job %s stored, its message not sent (a worker will send it): %s", record.id, exc
                )
        return record, False

    def _replicate(self, owner: str, job_id: str, idempotency_key: str | None) -> None:
        """Hold the answer until the new job has reached DREAMOMNI2_REDIS_MIN_REPLICAS replicas (so a
        failover cannot lose a job answered 202); if it cannot, delete it before any worker may take it
        and answer 503: nothing stored, so the client's retry makes no duplicate."""
        wanted = self.settings.redis_min_replicas
        try:
            reached = self.store.jobs.replicate(job_id, self.settings.job_ttl_s, wanted, REPLICA_WAIT_MS)
        except redis.RedisError as exc:
            logger.warning("job %s: waiting for its replicas failed: %s", job_id, exc)
            reached = 0
        if reached >= wanted:
            return
        key = [self.store.keys.idempotency(owner, idempotency_key)] if idempotency_key is not None else []
        try:
            outcome = self.store.jobs.discard(job_id, owner, also_delete=key)
        except redis.RedisError as exc:
            # The primary went away with the job: the job survives the failover only if it reached the
            # new primary, and then so did its Idempotency-Key's record, which a retry with the key
            # replays. Either way the answer is 503.
            logger.warning(
                "job %s reached %d of %d replicas and could not be deleted: %s", job_id, reached, wanted, exc
            )
            outcome = None
        if outcome is DiscardOutcome.TAKEN:  # a worker took it already: it exists, so it is the answer
            logger.warning("job %s reached %d of %d replicas, but a worker took it", job_id, reached, wanted)
            return
        self.metrics.jobs_rejected.labels(ErrorCode.UNAVAILABLE.value).inc()
        raise ServiceUnavailable(
            f"The job store could not copy the job to {wanted} replica(s) in time; nothing was stored. "
            "Try again shortly.",
            details={"replicas": reached, "min_replicas": wanted},
        )

    def quota(self, owner: str) -> Limits:
        """`owner`'s quotas: its own (`DREAMOMNI2_KEY_LIMITS`) where set, else the deployment's."""
        own = self.settings.key_limits.get(owner)
        return Limits(
            rate=(own and own.rate) or self.settings.rate_limit_per_s,
            burst=(own and own.burst) or self.settings.rate_limit_burst,
            active=(own and own.active) or self.settings.max_active_jobs_per_key,
        )

    def _admit(self, owner: str, job_id: str) -> None:
        """Take a submission token and a job slot, or refuse with 429 naming the limit."""
        limits = self.quota(owner)
        depth_cap = self.settings.max_queue_depth
        admission = self.store.quotas.admit(owner, job_id, limits, depth_cap, self.settings.job_ttl_s)
        if admission.refusal is Refusal.ADMITTED:
            return
        window = max(1, math.ceil(limits.burst / limits.rate))
        if admission.refusal is Refusal.RATE:
            retry_after = max(1, math.ceil(admission.value / 1000))
            code = ErrorCode.RATE_LIMITED
            message = (
                f"This API key submitted faster than its limit of {limits.rate:g} jobs per second "
                f"(bursts of {limits.burst}); try again in {retry_after} s."
            )
            policy, state = f'"rate";q={limits.burst};w={window}', f'"rate";r=0;t={retry_after}'
        elif admission.refusal is Refusal.ACTIVE_JOBS:
            retry_after = 5
            code = ErrorCode.ACTIVE_JOBS_LIMIT
            message = (
                f"This API key has {admission.value} jobs queued or running, its limit; submit more "
                "as they finish (or cancel some)."
            )
            policy, state = f'"active";q={limits.active}', f'"active";r=0;t={retry_after}'
        else:
            retry_after = 10
            code = ErrorCode.QUEUE_FULL
            message = (
                f"The service has {admission.value} jobs queued, its cap (DREAMOMNI2_MAX_QUEUE_DEPTH); "
                f"try again in {retry_after} s."
            )
            policy, state = f'"queue";q={depth_cap}', f'"queue";r=0;t={retry_after}'
        self.metrics.jobs_rejected.labels(code.value).inc()
        raise TooManyRequests(
            message,
            code=code,
            details={"limit": policy.split(";")[0].strip('"'), "retry_after_s": retry_after},
            headers={"Retry-After": str(retry_after), "RateLimit-Policy": policy, "RateLimit": state},
        )

    def _reserve(self, owner: str, key: str, fingerprint: str) -> JobRecord | None:
        """Reserve the Idempotency-Key; the earlier job when this request replays one."""
        reservation = self.store.idempotency.reserve(owner, key, fingerprint, self.settings.job_ttl_s)
        if reservation.outcome is Reservation.BODY_MISMATCH:
            raise InvalidInput(
                "This Idempotency-Key was already used with a different request body; "
                "use a new key for a new request.",
                code=ErrorCode.IDEMPOTENCY_KEY_REUSED,
            )
        if reservation.outcome is Reservation.IN_PROGRESS:
            raise Conflict(
                "A request with this Idempotency-Key is still being processed; retry shortly.",
                code=ErrorCode.IDEMPOTENCY_KEY_IN_USE,
            )
        if reservation.outcome is Reservation.REPLAY:
            return self.get(owner, reservation.job_id)
        return None

    def cancel(self, owner: str, job_id: str) -> tuple[JobRecord, bool]:
        """Cancel a job; returns it and whether the cancel is still under way (it was running)."""
        self.get(owner, job_id)
        outcome = self.store.jobs.cancel(job_id)
        if outcome is CancelOutcome.MISSING:
            raise _not_found(job_id)  # it expired between the two reads
        if outcome is CancelOutcome.DEQUEUED:
            self.notifier.notify(job_id, WebhookEvent.COMPLETED)
        elif outcome is not CancelOutcome.CANCEL_REQUESTED:
            raise Conflict(
                f"Job {job_id} already {outcome.value}; only queued or running jobs can be canceled.",
                code=ErrorCode.JOB_FINISHED,
                details={"status": outcome.value},
            )
        return self.get(owner, job_id), outcome is CancelOutcome.CANCEL_REQUESTED

    def expire_deadlines(self) -> int:
        """Cancel queued jobs past their deadline (any gateway replica may run this; it is atomic)."""
        expired = 0
        for job_id in self.store.jobs.due_deadlines():
            if self.store.jobs.expire_deadline(job_id):
                expired += 1
                self.notifier.notify(job_id, WebhookEvent.COMPLETED)
        return expired

    # Read -------------------------------------------------------------------------------------------
    def get(self, owner: str | None, job_id: str) -> JobRecord:
        """The job, if it exists and `owner` (None: anyone) owns it; else `NotFound`."""
        record = self.store.jobs.get(job_id)
        if record is None or (owner is not None and record.owner != owner):
            raise _not_found(job_id)
        return record

    def wait(self, record: JobRecord, seconds: float) -> JobRecord:
        """Hold until the job ends, up to `seconds` (capped by DREAMOMNI2_MAX_WAIT_S)."""
        if seconds <= 0 or record.status.is_terminal():
            return record
        try:
            waited = self.store.jobs.wait_until_terminal(record.id, min(seconds, self.settings.max_wait_s))
        except redis.RedisError as exc:
            # The job exists: answer with it (202) rather than a 5xx a client would retry.
            logger.warning("waiting on job %s failed; answering without the wait: %s", record.id, exc)
            return record
        if waited is None:
            raise _not_found(record.id)
        return waited

    def result(self, owner: str | None, job_id: str, index: int = 0) -> tuple[bytes, str]:
        """Result image `index` (0: the only one; a Feature Mixing pair: 0 the source, 1 the target)."""
        record = self.get(owner, job_id)
        if record.status is JobStatus.SUCCEEDED and record.spec.task.writes_text:
            raise NotFound(
                f"Job {job_id} is a {record.spec.task.value} job: it has no result image; its result is the "
                f"JSON `output` of the job object (GET /v1/jobs/{job_id}).",
                code=ErrorCode.RESULT_INDEX,
                details={"index": index, "results": 0},
            )
        if record.status is JobStatus.SUCCEEDED:
            results = record.all_results
            if results and index >= len(results):
                raise NotFound(
                    f"Job {job_id} has {len(results)} result image(s); index {index} does not exist "
                    f"(use 0{' or 1' if len(results) == 2 else ''}).",
                    code=ErrorCode.RESULT_INDEX,
                    details={"index": index, "results": len(results)},
                )
            data = self.store.jobs.result(job_id, index)
            if data is not None and results:
                return data, results[index].content_type
            raise NotFound(
                f"Job {job_id} succeeded, but its image has expired.",
                code=ErrorCode.RESULT_EXPIRED,
                details={"status": record.status.value},
            )
        if record.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise Conflict(
                f"Job {job_id} is {record.status.value}; the result is ready once its status is succeeded.",
                code=ErrorCode.JOB_NOT_FINISHED,
                details={"status": record.status.value},
            )
        reason = record.error.message if record.error else ""
        code = ErrorCode.JOB_CANCELED if record.status is JobStatus.CANCELED else ErrorCode.JOB_FAILED
        raise Conflict(
            f"Job {job_id} is {record.status.value} and has no result. {reason}".strip(),
            code=code,
            details={"status": record.status.value},
        )

    def signed_result(self, job_id: str, index: int, expires: int, signature: str) -> tuple[bytes, str]:
        """Result image `index` through a signed link: the signature is checked before the job is read
        (403 whether or not the job exists), then the expiry (410), then the job as for its owner."""
        self.result_links.check(job_id, index, expires, signature)
        return self.result(None, job_id, index)

    def links_at(self, request_base_url: str) -> ResultLinks:
        """Signed links at DREAMOMNI2_PUBLIC_URL, else at the base URL the request came to."""
        return self.result_links.at(self.settings.public_url or request_base_url)

    def render(self, record: JobRecord, base_url: str) -> Job:
        """The job object as the API shows it; its signed links at `links_at(base_url)`."""
        position = None
        if record.status is JobStatus.QUEUED:
            try:
                position = self.store.jobs.queue_position(record.id)
                if position is None:
                    # Claimed between the two reads: show the job as it is now, not queued nowhere.
                    record = self.store.jobs.get(record.id) or record
            except redis.RedisError as exc:  # the job is known; only its place in line is not
                logger.warning("queue position of %s unavailable: %s", record.id, exc)
        return job_view(record, position, self.links_at(base_url))

    def render_id(self, job_id: str, base_url: str) -> dict:
        """The job object of `job_id` as JSON data (the final event of a stream carries it)."""
        return self.render(self.get(None, job_id), base_url).model_dump(mode="json", by_alias=True)

    async def events(
        self, request: Request, owner: str, job_id: str, last_event_id: str | None
    ) -> AsyncIterator[dict[str, str]] | None:
        """The job's event stream; `NotFound` is raised here, before any of the stream is sent. None
        when the client has seen the final event already (the route answers 204: nothing more)."""
        await run_in_threadpool(self.get, owner, job_id)
        assert self.aredis is not None, "the app's lifespan opens it"
        if await stream_ended(self.aredis, self, job_id, last_event_id):
            return None
        return job_events(request, self.aredis, self, job_id, last_event_id)

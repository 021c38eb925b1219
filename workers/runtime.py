"""One worker process: the engine loaded once, a heartbeat, a reaper, and the job body."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import redis

from api_schemas.api import JobStatus, OutputFormat, ProgressEvent
from api_schemas.common import WebhookEvent
from api_schemas.errors import JobTimeout, LeaseLost, ServiceError
from api_schemas.jobs import JobMetadata
from api_schemas.records import JobRecord, StoredResult
from workers import metrics, tracing
from workers.celery_app import create_celery, enqueue, jobs_with_messages
from workers.config import WorkerSettings
from workers.consuming import CONSUMER, consumer_grace_s
from workers.failures import SUCCEEDED, job_end
from workers.logs import adopt_library_loggers, log_context
from workers.store import RequeueOutcome, Store
from workers.webhooks import Notifier

if TYPE_CHECKING:
    import PIL.Image

    from models.engine import Engine
    from models.settings import EngineSettings

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Exit status of a worker whose GPU failed for good (sysexits' EX_TEMPFAIL): a sticky CUDA error poisoned
#: this process's CUDA context; a new process (the restarted container) recovers.
EXIT_DEVICE_LOST = 75
#: Longest wait, on the way out after such a failure, for the heartbeat to stop and Redis to answer.
EXIT_GRACE_S = 10.0


def encode_image(image: PIL.Image.Image, output_format: OutputFormat) -> bytes:
    buffer = io.BytesIO()
    if output_format is OutputFormat.JPEG:
        image.save(buffer, format="JPEG", quality=95)
    elif output_format is OutputFormat.WEBP:
        image.save(buffer, format="WEBP", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class EngineResult:
    """What a successful run stores: the engine's metadata, and each result image's description and
    bytes (one image; a Feature Mixing pair: source, then target)."""

    metadata: JobMetadata
    results: list[tuple[StoredResult, bytes]]


class WorkerRuntime:
    """Everything a worker process holds between jobs.

    `start` announces the worker, loads the models (minutes with real weights) and only then marks
    it ready; Celery starts consuming after that, so no job waits on a half-loaded worker.
    """

    def __init__(self, settings: WorkerSettings, engine_settings: EngineSettings):
        self.settings = settings
        self.engine_settings = engine_settings
        self.store = Store.from_settings(settings)
        self.celery = create_celery(settings)
        self.notifier = Notifier(self.store, self.celery, settings)
        self.engine: Engine | None = None
        self._current: tuple[str, str] | None = None
        self._last_progress = time.monotonic()
        self._lease_lost = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Queued jobs that had no message at the last reaper pass: resent if still so at the next.
        self._unsent: set[str] = set()
        self._info: dict[str, Any] = {"name": settings.worker_name, "ready": False, "started_at": time.time()}
        CONSUMER.listen(self._announce_change)

    # Lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        adopt_library_loggers(self.settings.log_format)  # first: they log as soon as they are imported
        from models.engine import Engine

        if self.settings.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(self.settings.metrics_port)
        self._spawn(self._heartbeat_loop, "heartbeat")
        started = time.perf_counter()
        self.engine = Engine.from_settings(self.engine_settings)
        load_s = time.perf_counter() - started
        metrics.MODEL_LOAD_SECONDS.set(load_s)
        if self.engine.memory_plan is not None:
            for device, planned in self.engine.memory_plan.devices.items():
                metrics.GPU_PEAK_BYTES.labels(device, "planned").set(planned)
        metrics.WORKER_READY.set(1)
        models = self.engine.describe()
        speed = models["speed"]
        if speed.get("fallback"):
            logger.warning(
                "speed profile %s not applied: this worker serves with %s instead (%s); /readyz counts it "
                "under workers.speed_fallbacks",
                speed["profile"],
                speed["fallback"],
                speed.get("error"),
            )
        self._info.update(
            ready=True,
            preset=self.engine_settings.preset.value,
            device=models["device"],
            memory=models,
            translator=self.engine.translator is not None,
            load_s=round(load_s, 3),
        )
        self._announce()
        self._touch_liveness()
        self._spawn(self._reaper_loop, "reaper")
        logger.info("worker %s ready in %.1fs", self.settings.worker_name, load_s)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        metrics.WORKER_READY.set(0)
        self.settings.liveness_file.unlink(missing_ok=True)
        try:
            self.store.workers.retire(self.settings.worker_name)
        except Exception:
            logger.warning("could not retire worker %s from Redis", self.settings.worker_name)

    def exit_device_lost(self, exc: BaseException, job: tuple[str, str] | None = None) -> NoReturn:
        """Leave this process after a sticky device error (`models.failures.DeviceLost`): its CUDA context
        is poisoned, every later job would fail, and only a new process recovers.

        `job` (id, run token) is the job that was running: it is given back at once (its lease dropped,
        no outcome written: the job did nothing wrong), so the reapers requeue it at their next pass,
        its attempt counted. The heartbeat stops first, as it would renew the lease or take it back. The
        worker leaves the registry, the logs are flushed, and the process ends with `EXIT_DEVICE_LOST`
        through `os._exit`: atexit handlers, finalizers and CUDA destructors can hang or crash on a
        poisoned context, so none of them run.
        """
        where = f"running job {job[0]}" if job else "while starting"
        logger.critical(
            "the GPU failed for good %s (%s); worker %s takes no more jobs and exits with status %d to be "
            "replaced",
            where,
            exc,
            self.settings.worker_name,
            EXIT_DEVICE_LOST,
        )
        deadline = time.monotonic() + EXIT_GRACE_S
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        # Redis calls have no timeout of their own: a Redis that does not answer must not keep this
        # process alive. Whatever is not done in time, the lease's and the registry's expiry do.
        goodbye = threading.Thread(target=self._give_back, args=(job,), name="give-back", daemon=True)
        goodbye.start()
        goodbye.join(timeout=max(0.0, deadline - time.monotonic()))
        self.settings.liveness_file.unlink(missing_ok=True)
        logging.shutdown()  # flushes every handler: os._exit skips the interpreter's own flush
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or replaced stream: nothing left to save
                pass
        os._exit(EXIT_DEVICE_LOST)

    def _give_back(self, job: tuple[str, str] | None) -> None:
        """Release `job`'s lease and retire the worker from the registry (on the way out)."""
        if job is not None:
            job_id, token = job
            try:
                if self.store.jobs.release(job_id, token):
                    logger.warning("job %s given back: the next reaper pass requeues it", job_id)
                else:
                    logger.warning("job %s was no longer this run's; nothing given back", job_id)
            except redis.RedisError as exc:
                logger.error("could not give job %s back (%s); requeued once its lease lapses", job_id, exc)
        try:
            self.store.workers.retire(self.settings.worker_name)
        except redis.RedisError as exc:
            logger.error("could not retire worker %s (%s); its entry expires", self.settings.worker_name, exc)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _announce(self) -> None:
        self.store.workers.announce(
            self.settings.worker_name,
            {**self._info, "busy": self._current is not None, "consuming": CONSUMER.consuming},
            3 * self.settings.heartbeat_s,
        )

    def _announce_change(self, consuming: bool) -> None:
        """Announce at once when the consumer starts or stops (readiness counts consuming workers)."""
        if self._info["ready"]:
            self._announce()

    def _touch_liveness(self, redis_answers: bool = True) -> None:
        """Prove liveness only while ready and not stuck: idle, or the running job moved recently; and
        the consumer consuming (or waiting for Redis)."""
        if not self._info["ready"]:
            return
        healthy, why = CONSUMER.healthy(redis_answers, consumer_grace_s(self.settings.heartbeat_s))
        if not healthy:
            logger.error("%s; liveness withheld", why)
            return
        if (
            self._current is not None
            and time.monotonic() - self._last_progress > self.settings.stall_timeout_s
        ):
            stalled = time.monotonic() - self._last_progress
            logger.error("job %s: no progress for %.0fs; liveness withheld", self._current[0], stalled)
            return
        self.settings.liveness_file.touch()

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                try:
                    self._announce()
                except redis.RedisError:
                    self._touch_liveness(redis_answers=False)
                    raise
                self._touch_liveness()
                current = self._current
                if current and not self.store.jobs.renew_lease(*current, self.settings.lease_ttl_s):
                    logger.warning("lost the lease of job %s; stopping it", current[0])
                    self._lease_lost.set()
            except Exception:
                logger.exception("heartbeat failed; retrying")
            self._stop.wait(self.settings.heartbeat_s)

    def _reaper_loop(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_s):
            try:
                self.reap()
            except Exception:
                logger.exception("reaper pass failed; retrying")

    def reap(self) -> None:
        """Requeue jobs whose worker stopped renewing its lease (dead, or cut off from Redis)."""
        # After a Redis restart the live runs get two leases' time to take their leases back.
        grace = 2 * self.settings.lease_ttl_s
        for job_id, outcome in self.store.jobs.requeue_lost(
            self.settings.max_attempts, restart_grace_s=grace
        ):
            if outcome is RequeueOutcome.REQUEUED:
                metrics.REQUEUED.inc()
                enqueue(self.celery, self.settings, job_id, front=True)
                logger.warning("job %s lost its worker; requeued", job_id)
            else:
                logger.error("job %s lost its worker %d times; failed", job_id, self.settings.max_attempts)
                self.notifier.notify(job_id, WebhookEvent.COMPLETED)
        self.store.jobs.prune_queue()
        self.resend_lost_messages()

    def resend_lost_messages(self) -> list[str]:
        """Send a new message for each queued job that has none: the job store is the truth.

        A message goes missing when a gateway dies between storing a job and sending it, or when a
        worker dies after the broker handed it the message but before the delivery was recorded. A job
        is resent only when it had no message at two passes in a row (a message on its way is seen
        at the second), and by one worker (a short Redis lock); a duplicate would still be harmless,
        as only a queued job is claimed. Returns the ids resent."""
        queued = set(self.store.jobs.queued_ids())
        missing = queued - jobs_with_messages(self.celery, self.settings) if queued else set()
        resent = []
        for job_id in sorted(missing & self._unsent):
            if self.store.jobs.lock_resend(job_id, ttl_s=max(10.0, 3 * self.settings.reaper_interval_s)):
                enqueue(self.celery, self.settings, job_id, front=True)
                metrics.RESENT.inc()
                resent.append(job_id)
                logger.warning("job %s was queued without a queue message; sent it again", job_id)
        self._unsent = missing - set(resent)
        return resent

    # The job ---------------------------------------------------------------------------------------
    def run_job(self, job_id: str) -> str:
        """The job body of a `run_job` message. Safe to receive twice: only a queued job is claimed.
        Its log lines carry the job's id, and its request's once the job is read."""
        with log_context(job_id=job_id):
            claim = self.store.jobs.claim(
                job_id, worker=self.settings.worker_name, lease_ttl_s=self.settings.lease_ttl_s
            )
            if not claim.claimed:
                logger.info("job %s not run: it is %s", job_id, claim.outcome.value)
                return claim.outcome.value
            self._lease_lost.clear()
            self._last_progress = time.monotonic()
            self._current = (job_id, claim.token)
            self._announce()
            self.notifier.notify(job_id, WebhookEvent.STARTED)
            try:
                return self._execute(job_id, claim.token)
            finally:
                self._current = None
                self._announce()

    def _execute(self, job_id: str, token: str) -> str:
        assert self.engine is not None, "start() loads the engine before jobs are taken"
        record = self.store.jobs.get(job_id)
        if record is None:  # expired between the claim and now: nothing left to run or report
            logger.warning("job %s expired as it started", job_id)
            return "expired"
        if record.started_at is not None:
            metrics.QUEUE_WAIT.observe(max(0.0, record.started_at - record.created_at))
        # The run continues the job's trace (from its submit request), wherever and whenever it runs.
        attributes = {
            **tracing.job_attributes(record),
            "dreamomni2.worker": self.settings.worker_name,
            "dreamomni2.memory_mode": self.engine_settings.memory.value,
            "dreamomni2.speed_profile": self.engine.profile.serving,
            "dreamomni2.attempt": record.attempts,
        }
        with (
            log_context(request_id=record.request_id),
            tracing.span("run_job", parent=record.traceparent, kind="consumer", attributes=attributes),
        ):
            spec = record.spec
            logger.info(
                "job %s started: %s, adapter %s, %d image(s), %d steps, attempt %d",
                job_id,
                spec.task.value,
                spec.adapter.value,
                spec.image_count,
                spec.job.steps,
                record.attempts,
            )
            return self._run_and_store(record, token)

    def _run_and_store(self, record: JobRecord, token: str) -> str:
        """Run the job to its end and store the outcome (the `upload`); returns its status."""
        from models.failures import DeviceLost  # here, not at the top: `--help` must not load torch

        job_id = record.id
        try:
            end, output = SUCCEEDED, self._run_engine(record, token)
        except LeaseLost:
            logger.warning("job %s: run abandoned after losing its lease", job_id)
            tracing.annotate({"dreamomni2.outcome": "abandoned"}, error="the run lost its lease")
            return "abandoned"
        except DeviceLost as exc:  # not the job's fault: it runs again elsewhere; this process cannot
            self.exit_device_lost(exc, job=(job_id, token))
        except Exception as exc:  # MemoryError included: the table says what each one means
            if not isinstance(exc, ServiceError | MemoryError):
                logger.exception("job %s failed", job_id)
            end, output = job_end(exc), None
        results = output.results if output else ()
        with tracing.span(
            "upload",
            attributes={
                "dreamomni2.job.id": job_id,
                "dreamomni2.results": len(results),
                "dreamomni2.result_bytes": sum(len(data) for _, data in results),
            },
        ):
            written = self._until_stored(
                lambda: self.store.jobs.finish(
                    job_id,
                    token,
                    end.status,
                    ttl_s=record.ttl_s,
                    metadata=output.metadata if output else None,
                    error=end.error,
                    results=results,
                ),
                f"the outcome of job {job_id}",
            )
        adapter = output.metadata.adapter if output else record.spec.adapter
        metrics.JOBS.labels(record.spec.task.value, adapter.value, end.outcome).inc()
        failure = end.error if end.status is JobStatus.FAILED else None
        tracing.annotate(
            {"dreamomni2.outcome": end.outcome, "dreamomni2.seed": output.metadata.seed if output else None},
            error=failure and f"{failure.code}: {failure.message}",
        )
        if written:
            logger.info("job %s ended: %s", job_id, end.outcome)
            self.notifier.notify(job_id, WebhookEvent.COMPLETED)  # never raises: it logs a failure
        else:
            logger.warning("job %s: another run owns it now; this run's outcome was dropped", job_id)
        return end.status.value

    def _until_stored(self, write: Callable[[], T], what: str) -> T:
        """`write()`, again every second while Redis is unreachable (up to the job timeout): a job
        that ran to its end is not lost, nor run again, because Redis was away when it ended."""
        deadline = time.monotonic() + max(60.0, self.settings.job_timeout_s)
        while True:
            try:
                return write()
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise
                logger.warning("Redis unreachable while storing %s (%s); retrying", what, exc)
                self._stop.wait(1.0)

    def _run_engine(self, record: JobRecord, token: str) -> EngineResult:
        """Run the job's spec on the engine, reporting progress and honouring cancel and timeout."""
        assert self.engine is not None
        job_id, spec = record.id, record.spec
        deadline = time.monotonic() + self.settings.job_timeout_s
        progress_hooks = spec.wants(WebhookEvent.PROGRESS)
        last_progress_hook = 0.0

        def should_cancel() -> bool:
            if self._lease_lost.is_set():
                raise LeaseLost("This run lost its lease; another run owns the job.")
            if time.monotonic() > deadline:
                raise JobTimeout(
                    f"The job ran longer than the limit of {self.settings.job_timeout_s} s and was stopped; "
                    "use fewer steps or fewer images.",
                    details={"limit_s": self.settings.job_timeout_s},
                )
            try:
                return self.store.jobs.cancel_requested(job_id)
            except redis.RedisError:  # Redis away: keep computing; the lease comes back with it
                return False

        def on_progress(stage: str, step: int, total: int, *, preview: str | None = None) -> None:
            nonlocal last_progress_hook
            self._last_progress = now = time.monotonic()
            progress = ProgressEvent(stage=stage, step=step, total=total, preview=preview)
            try:
                self.store.jobs.progress(job_id, token, progress)
                if progress_hooks and now - last_progress_hook >= self.settings.webhook_progress_interval_s:
                    last_progress_hook = now
                    self.notifier.notify(job_id, WebhookEvent.PROGRESS)
            except redis.RedisError as exc:  # a progress update missed; the job goes on
                logger.warning("job %s: progress not stored, Redis unreachable (%s)", job_id, exc)

        from models.stages import observing

        # A span per stage, while tracing is on: the engine marks them, it knows nothing of tracing.
        stage_spans = tracing.stage_spans({"dreamomni2.job.id": job_id})
        with observing(stage_spans) if stage_spans else contextlib.nullcontext():
            output = self.engine.run(
                self.store.jobs.images(job_id),
                spec.job,
                on_progress=on_progress,
                should_cancel=should_cancel,
                preview_every=self.settings.preview_every,
            )
        results = []
        seeds = output.metadata.seeds or [None] * len(output.images)
        for image, seed in zip(output.images, seeds, strict=True):
            data = encode_image(image, spec.output_format)
            info = StoredResult(
                width=image.width,
                height=image.height,
                content_type=spec.output_format.content_type,
                bytes=len(data),
                seed=seed,
            )
            results.append((info, data))
        for stage, seconds in output.metadata.timings.items():
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)
        for (device, kind), peak in self.engine.last_gpu_peak.items():
            metrics.GPU_PEAK_BYTES.labels(device, kind).set(peak)
        return EngineResult(output.metadata, results)

"""Signed webhooks (Standard Webhooks): signing, delivery with retries, and the jobs' notifier.

Deliveries run on a Celery queue of their own, consumed by `python -m workers.webhooks` (no models,
many threads), so a GPU worker only enqueues a delivery id and never waits on a slow receiver.
A failed attempt's retry waits in the job store (`Deliveries.record_attempt`), not in a worker: the
webhook worker's `RetryScheduler` sends its message when it is due, so a worker holds a message only
for one attempt, and a Redis outage or a worker's death leaves no retry stranded in the broker.
Every attempt of a delivery sends the same body under the same `webhook-id`, signed afresh with the
attempt's timestamp, as the specification asks. Destinations are checked by `workers.destinations`.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import redis
from celery import Celery
from kombu.exceptions import OperationalError
from standardwebhooks import Webhook

from api_schemas.api import JobStatus, WebhookDelivery
from api_schemas.common import WebhookEvent
from api_schemas.errors import InvalidInput
from api_schemas.records import DeliveryRecord
from workers import tracing
from workers.celery_app import DELIVER_TASK
from workers.config import ServiceSettings
from workers.consuming import CONSUMER, LivenessFile, consumer_grace_s
from workers.destinations import Allowlist, check_destination, pinned_request_url
from workers.logs import celery_flags, configure_logging, log_context, set_process_fields
from workers.result_links import ResultLinkSigner
from workers.store import Store
from workers.views import job_view

logger = logging.getLogger(__name__)

USER_AGENT = "DreamOmni2-Serve-Webhooks/1"


def signed_headers(secret: str, delivery_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt."""
    now = now or datetime.now(tz=UTC)
    return {
        "webhook-id": delivery_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(delivery_id, now, body),
    }


@dataclass(frozen=True)
class AttemptOutcome:
    delivered: bool
    status_code: int | None
    error: str | None


def attempt_delivery(
    url: str, body: str, delivery_id: str, secret: str, allowlist: Allowlist, timeout_s: float
) -> AttemptOutcome:
    """One POST of the body: 2xx is delivered; anything else, a redirect included, is a failure."""
    try:
        destination = check_destination(url, allowlist)
    except InvalidInput as exc:
        return AttemptOutcome(False, None, exc.message)
    pinned, headers, extensions = pinned_request_url(destination)
    headers |= signed_headers(secret, delivery_id, body)
    headers |= {"content-type": "application/json", "user-agent": USER_AGENT}
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
            response = client.post(pinned, content=body.encode(), headers=headers, extensions=extensions)
    except httpx.HTTPError as exc:
        return AttemptOutcome(False, None, f"{type(exc).__name__}: {exc}")
    if 200 <= response.status_code < 300:
        return AttemptOutcome(True, response.status_code, None)
    reason = "redirects are not followed" if response.is_redirect else "non-2xx answer"
    return AttemptOutcome(False, response.status_code, f"HTTP {response.status_code} ({reason})")


class Notifier:
    """Turns job events into webhook deliveries: a stored snapshot of the job object plus a message."""

    def __init__(self, store: Store, celery: Celery, settings: ServiceSettings):
        self.store = store
        self.celery = celery
        self.settings = settings
        # No request to take a base URL from: results get signed links only at DREAMOMNI2_PUBLIC_URL.
        signer = ResultLinkSigner.from_settings(settings)
        self.links = signer.at(settings.public_url) if settings.public_url else None

    def notify(self, job_id: str, event: WebhookEvent) -> str | None:
        """Queue a delivery of the job object as it is now; returns the delivery id, if any.

        Never raises: a job's outcome is already written when it notifies. A failure is logged, since
        the caller's receiver will then not hear of this event.
        """
        try:
            record = self.store.jobs.get(job_id)
            if record is None or not record.spec.wants(event) or record.spec.webhook is None:
                return None
            position = self.store.jobs.queue_position(job_id) if record.status is JobStatus.QUEUED else None
            body = job_view(record, position, self.links).model_dump_json(by_alias=True)
            delivery_id = f"msg_{uuid.uuid4().hex}"
            self.store.deliveries.create(
                delivery_id,
                job_id=job_id,
                owner=record.owner,
                url=record.spec.webhook.url,
                event=event,
                body=body,
                ttl_s=record.ttl_s,
                request_id=record.request_id,
                traceparent=record.traceparent,
            )
        except redis.RedisError:
            logger.exception("could not store the %s webhook of job %s: Redis is unreachable", event, job_id)
            return None
        try:
            self.celery.send_task(DELIVER_TASK, args=[delivery_id], queue=self.settings.webhook_queue)
        except Exception:
            logger.exception("could not queue webhook %s for job %s", delivery_id, job_id)
        return delivery_id


def backoff_s(attempt: int, first_s: float) -> float:
    """Delay before attempt `attempt + 1`: the first delay, doubling (30 s, 1 min, 2 min, ...)."""
    return first_s * 2 ** (attempt - 1)


def total_schedule_s(attempts: int, first_s: float) -> float:
    return sum(backoff_s(n, first_s) for n in range(1, attempts))


class WebhookDeliverer:
    """The body of the webhook queue's task: one attempt, and when to try again."""

    def __init__(self, store: Store, settings: ServiceSettings):
        self.store = store
        self.settings = settings

    @property
    def allowlist(self) -> Allowlist:
        return self.settings.webhook_allowlist

    def secret_for(self, owner: str) -> str | None:
        return self.settings.webhook_secrets.get(owner) or self.settings.webhook_secret or None

    def deliver(self, delivery_id: str) -> float | None:
        """Make one attempt and schedule the next one if due; returns its delay, or None when done.
        The attempt's log lines carry its job's ids, and its span continues the job's trace."""
        delivery = self.store.deliveries.get(delivery_id)
        if delivery is None:
            logger.warning("webhook %s expired before delivery", delivery_id)
            return None
        if delivery.done:  # a second copy of a message, handed out again after a reconnection
            logger.info("webhook %s is settled already; a repeated message sends nothing", delivery_id)
            return None
        attributes = {
            "dreamomni2.job.id": delivery.job_id,
            "dreamomni2.webhook.id": delivery_id,
            "dreamomni2.webhook.event": delivery.event.value,
            "dreamomni2.webhook.attempt": delivery.attempts + 1,
        }
        with (
            log_context(job_id=delivery.job_id, request_id=delivery.request_id),
            tracing.span(
                "webhook_attempt", parent=delivery.traceparent, kind="client", attributes=attributes
            ),
        ):
            return self._attempt(delivery_id, delivery)

    def _attempt(self, delivery_id: str, delivery: DeliveryRecord) -> float | None:
        secret = self.secret_for(delivery.owner)
        attempt = delivery.attempts + 1
        if secret is None:
            outcome = AttemptOutcome(False, None, "no webhook secret is configured for this key")
        else:
            timeout = self.settings.webhook_timeout_s
            outcome = attempt_delivery(
                delivery.url, delivery.body, delivery_id, secret, self.allowlist, timeout
            )
        final = outcome.delivered or attempt >= self.settings.webhook_max_attempts or secret is None
        status = "delivered" if outcome.delivered else ("failed" if final else "retrying")
        summary = WebhookDelivery(
            id=delivery_id,
            event=delivery.event,
            status=status,
            attempts=attempt,
            status_code=outcome.status_code,
            error=outcome.error,
            at=datetime.now(tz=UTC),
        )
        tracing.annotate(
            {"http.response.status_code": outcome.status_code, "dreamomni2.webhook.status": status},
            error=None if outcome.delivered else outcome.error,
        )
        delay = None if final else backoff_s(attempt, self.settings.webhook_backoff_s)
        retry_at = None if delay is None else time.time() + delay
        self.store.deliveries.record_attempt(
            delivery_id, delivery.job_id, summary, retry_at=retry_at, final=final
        )
        if final:
            log = logger.info if outcome.delivered else logger.warning
            log(
                "webhook %s for job %s: %s after %d attempt(s)", delivery_id, delivery.job_id, status, attempt
            )
        return delay


class RetryScheduler:
    """Sends the messages of the retries that are due: a thread of each webhook worker process.

    Every `poll_s` it claims the due retries (atomically, so two workers never both send one), sends
    each one's message and marks it sent. A retry whose message could not be sent stays claimed and is
    due again after `claim_s`. Errors (Redis away) are logged once and tried again at the next poll.
    """

    def __init__(
        self,
        store: Store,
        celery: Celery,
        settings: ServiceSettings,
        poll_s: float = 0.5,
        claim_s: float = 60.0,
        liveness: LivenessFile | None = None,
    ):
        self.store = store
        self.celery = celery
        self.settings = settings
        #: Beaten on every poll: this thread knows whether Redis answers.
        self.liveness = liveness
        self.poll_s = poll_s
        self.claim_s = claim_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def run_once(self, batch: int = 100) -> int:
        """Send the retries due now, `batch` at a time; returns how many were sent."""
        sent = 0
        while not self._stop.is_set():
            claimed = self.store.deliveries.claim_retries(time.time(), self.claim_s, batch)
            for delivery_id in claimed.ids:
                self.celery.send_task(DELIVER_TASK, args=[delivery_id], queue=self.settings.webhook_queue)
                self.store.deliveries.sent(delivery_id, claimed)
                sent += 1
            if len(claimed.ids) < batch:
                break
        return sent

    def run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.run_once()
            except Exception as exc:  # the thread outlives any error; claimed retries come back
                unreachable = isinstance(exc, redis.RedisError | OperationalError)
                if not self._failing:
                    logger.warning(
                        "webhook retries cannot be sent (%s); trying again", exc, exc_info=not unreachable
                    )
                self._failing = True
                if self.liveness is not None:
                    self.liveness.beat(redis_answers=not unreachable)
            else:
                if self._failing:
                    logger.info("webhook retries are sent again")
                self._failing = False
                if self.liveness is not None:
                    self.liveness.beat(redis_answers=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="webhook-retries", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def main(argv: Iterable[str] = ()) -> int:
    """`python -m workers.webhooks`: consume the webhook queue with many threads (I/O bound), and send
    the retries that fall due."""
    from workers.celery_app import create_webhook_celery
    from workers.tasks import WebhookTask

    configure_logging()
    settings = ServiceSettings()
    set_process_fields(worker=f"webhooks@{socket.gethostname()}")
    tracing.configure_tracing("dreamomni2-webhooks")
    app = create_webhook_celery(settings)
    store = Store.from_settings(settings)
    WebhookTask.deliverer = WebhookDeliverer(store, settings)
    liveness = LivenessFile(settings.liveness_file, consumer_grace_s(settings.heartbeat_s))
    scheduler = RetryScheduler(store, app, settings, liveness=liveness)
    scheduler.start()
    try:
        app.worker_main(
            [
                *celery_flags(settings.log_format),  # `celery`'s own options, before the sub-command
                "worker",
                "--pool=threads",
                f"--concurrency={settings.webhook_concurrency}",
                f"--queues={settings.webhook_queue}",
                "--hostname=webhooks@%h",
                "--without-gossip",
                "--without-mingle",
                "--loglevel=INFO",
                *argv,
            ]
        )
    finally:
        scheduler.stop()
    # Non-zero when Celery's worker stopped on an error it could not recover from: to be replaced.
    if code := CONSUMER.exit_code:
        logger.critical("the Celery consumer stopped for good (status %d); exiting to be replaced", code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

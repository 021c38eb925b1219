"""The Celery app: Redis as the broker only, tuned for long GPU jobs. Messages carry only ids.

Celery is the transport here, not the state: job state, inputs and results live in the job store
(`workers.store`), so there is no result backend and task return values are ignored.
"""

from __future__ import annotations

import base64
import contextlib
import json

from celery import Celery

from workers.broker import SENTINEL_TRANSPORT, TRANSPORT
from workers.config import ServiceSettings
from workers.consuming import track_consumer

#: The gateway sends jobs by this name; `workers.tasks` defines it.
RUN_JOB_TASK = "dreamomni2.run_job"
#: Webhook deliveries, on their own queue (`DREAMOMNI2_WEBHOOK_QUEUE`).
DELIVER_TASK = "dreamomni2.deliver_webhook"
#: Where Kombu keeps the messages the webhook workers hold (Kombu's defaults, `unacked`, ... hold the
#: GPU workers'): each set is handed out again after its own visibility timeout, by its own workers.
WEBHOOK_UNACKED_KEYS = {
    "unacked_key": "unacked_webhooks",
    "unacked_index_key": "unacked_webhooks_index",
    "unacked_mutex_key": "unacked_webhooks_mutex",
}


def create_celery(settings: ServiceSettings) -> Celery:
    """The Celery configuration of every process: the gateway and the GPU workers use it as it is, the
    webhook workers as `create_webhook_celery` changes it."""
    target = settings.redis_target
    app = Celery("dreamomni2", broker=target.broker_url, set_as_current=True)
    app.conf.update(
        broker_transport=SENTINEL_TRANSPORT if target.uses_sentinel else TRANSPORT,
        task_default_queue=settings.queue,
        task_ignore_result=True,
        # Acknowledge after the task, so the message of a worker that died is delivered again; the job
        # store's run tokens make a second delivery harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Poll the queues in the order the worker names them (front first), not round robin.
            "queue_order_strategy": "priority",
            **target.broker_options,
        },
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    track_consumer(app)  # a worker says whether it consumes, and reconnects promptly
    return app


def create_webhook_celery(settings: ServiceSettings) -> Celery:
    """The webhook workers' app: their messages are held for one attempt only (retries wait in the job
    store), so a short visibility timeout, on unacked keys of their own, since a GPU job's message
    legitimately stays unacknowledged for the whole job."""
    app = create_celery(settings)
    app.conf.broker_transport_options = {
        "visibility_timeout": settings.webhook_visibility_timeout_s,
        **WEBHOOK_UNACKED_KEYS,
        # Look for lapsed messages every 10 s (Kombu's default interval) rather than every 10th time.
        "unacked_restore_throttle": 1,
        **settings.redis_target.broker_options,
    }
    return app


def enqueue(app: Celery, settings: ServiceSettings, job_id: str, *, front: bool = False) -> None:
    """Send the message that makes a worker run `job_id`; `front` for a job that already waited its
    turn (requeued or resent), which then goes before every new job."""
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=settings.front_queue if front else settings.queue)


def _job_id(message: dict) -> str | None:
    """The job id a broker message carries (`run_job`'s only argument), or None for other messages."""
    try:
        if message.get("headers", {}).get("task") != RUN_JOB_TASK:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def jobs_with_messages(app: Celery, settings: ServiceSettings) -> set[str]:
    """Ids of the jobs whose message is in the broker: waiting in the queue, or delivered to a worker
    and not acknowledged yet (Kombu's Redis transport keeps those in its `unacked` hash).

    The names come from Kombu's own channel, so they follow its configuration."""
    messages: list[dict] = []
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        client = channel.client
        for queue in (settings.front_queue, settings.queue):
            for priority in channel.priority_steps:
                for payload in client.lrange(channel._q_for_pri(queue, priority), 0, -1):
                    with contextlib.suppress(ValueError):
                        messages.append(json.loads(payload))
        # An unacked entry is `[message, exchange, routing key]`.
        for delivered in client.hvals(channel.unacked_key):
            with contextlib.suppress(ValueError, IndexError, TypeError):
                messages.append(json.loads(delivered)[0])
    return {job_id for job_id in map(_job_id, messages) if job_id is not None}

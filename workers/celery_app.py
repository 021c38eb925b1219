"""The Celery app: Redis as the broker only, tuned for long GPU jobs. Messages carry only ids.

Celery is the transport here, not the state: job state, inputs and results live in the job store
(`workers.store`), so there is no result backend and task return values are ignored.
"""

from __future__ import annotations

from celery import Celery

from workers.config import ServiceSettings

#: The gateway sends jobs by this name; `workers.tasks` defines it.
RUN_JOB_TASK = "dreamomni2.run_job"
#: Webhook deliveries, on their own queue (`DREAMOMNI2_WEBHOOK_QUEUE`).
DELIVER_TASK = "dreamomni2.deliver_webhook"


def create_celery(settings: ServiceSettings) -> Celery:
    """The one Celery configuration of every process (gateway, GPU workers, webhook workers)."""
    app = Celery("dreamomni2", broker=settings.redis_url, set_as_current=True)
    app.conf.update(
        task_default_queue=settings.queue,
        task_ignore_result=True,
        # Acknowledge after the task, so the message of a worker that died is delivered again; the job
        # store's run tokens make a second delivery harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


def enqueue(app: Celery, settings: ServiceSettings, job_id: str) -> None:
    """Send the message that makes a worker run `job_id`."""
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=settings.queue)

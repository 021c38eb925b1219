"""The Celery app: Redis as broker and result backend, tuned for long GPU jobs."""

from __future__ import annotations

from celery import Celery

from workers.config import ServiceSettings

#: The gateway sends jobs by this name; only workers register the task itself.
RUN_JOB_TASK = "dreamomni2.run_job"


def create_celery(settings: ServiceSettings) -> Celery:
    """A Celery app whose messages carry only job ids; images and results stay in the job store."""
    app = Celery("dreamomni2", broker=settings.redis_url, backend=settings.redis_url)
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_default_queue=settings.queue,
        # Acknowledge after the job, so a message of a worker that died is not lost; the job store's
        # run tokens make a second delivery harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        result_expires=settings.job_ttl_s,
        task_serializer="json",
        result_serializer="json",
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

"""The Celery tasks, and their base classes holding what a worker process loads once.

`python -m workers` builds the `WorkerRuntime` (models loaded, minutes with real weights) and sets it
on `JobTask` before Celery consumes a single message; `python -m workers.webhooks` does the same with
the `WebhookDeliverer`. The tasks themselves only hand the message's id over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from celery import Task, shared_task

from workers.celery_app import DELIVER_TASK, RUN_JOB_TASK

if TYPE_CHECKING:
    from workers.runtime import WorkerRuntime
    from workers.webhooks import WebhookDeliverer


class JobTask(Task):
    """Base of `run_job`: the process's worker runtime, ready before the first message."""

    runtime: ClassVar[WorkerRuntime | None] = None


class WebhookTask(Task):
    """Base of `deliver_webhook`: the process's deliverer."""

    deliverer: ClassVar[WebhookDeliverer | None] = None


@shared_task(name=RUN_JOB_TASK, base=JobTask, bind=True)
def run_job(task: JobTask, job_id: str) -> None:
    """Run one job. Safe to receive twice: only a queued job is claimed."""
    assert task.runtime is not None, "python -m workers sets the runtime before consuming"
    task.runtime.run_job(job_id)


@shared_task(name=DELIVER_TASK, base=WebhookTask, bind=True)
def deliver_webhook(task: WebhookTask, delivery_id: str) -> None:
    """One delivery attempt. A failed one's retry waits in the job store, not here, so the message is
    acknowledged at once; the webhook worker's `RetryScheduler` sends a new one when it is due."""
    assert task.deliverer is not None, "python -m workers.webhooks sets the deliverer before consuming"
    task.deliverer.deliver(delivery_id)

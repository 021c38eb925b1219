"""Start one GPU worker process: `python -m workers` (one per GPU).

Loads the models first, then consumes the job queue with Celery's solo pool: the task runs in this
process, next to the resident models, one job at a time, and SIGTERM finishes the running job first.
"""

from __future__ import annotations

import logging
import sys

from workers.celery_app import RUN_JOB_TASK
from workers.config import WorkerSettings
from workers.runtime import WorkerRuntime


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from models.settings import EngineSettings

    settings = WorkerSettings()
    runtime = WorkerRuntime(settings, EngineSettings())
    runtime.celery.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)(runtime.run_job)
    runtime.start()
    try:
        runtime.celery.worker_main(
            [
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "--prefetch-multiplier=1",
                f"--queues={settings.queue}",
                f"--hostname={settings.worker_name}",
                "--without-gossip",
                "--without-mingle",
                "--loglevel=INFO",
                *(argv or []),
            ]
        )
    finally:
        runtime.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

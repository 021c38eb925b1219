"""Start one GPU worker process: `python -m workers` (one per GPU).

Loads the models first, then consumes the job queue with Celery's solo pool: the task runs in this
process, next to the resident models, one job at a time, and SIGTERM finishes the running job first.
"""

from __future__ import annotations

import argparse
import logging
import sys

from workers.config import WorkerSettings
from workers.consuming import CONSUMER
from workers.logs import celery_flags, configure_logging, set_process_fields
from workers.runtime import EXIT_DEVICE_LOST, WorkerRuntime
from workers.tracing import configure_tracing

logger = logging.getLogger("workers")


#: Exit status of a worker refused by its configuration (sysexits' EX_CONFIG): restarting won't help.
EXIT_CONFIG = 78
# The other non-zero status, EXIT_DEVICE_LOST (75), is the runtime's: the GPU failed for good.


def parse_args(argv: list[str]) -> list[str]:
    """`--help` answers before anything is loaded or announced; other options go to `celery worker`."""
    parser = argparse.ArgumentParser(
        prog="python -m workers",
        description=__doc__.split("\n\n")[0] + " Configured by DREAMOMNI2_* settings (README, Settings).",
        epilog="Any other option is passed to `celery worker` (e.g. --loglevel=DEBUG). "
        f"Exit status {EXIT_CONFIG}: a setting was refused (restarting will not help). "
        f"Exit status {EXIT_DEVICE_LOST}: the GPU failed for good (a sticky CUDA error such as an illegal "
        "memory access); its running job, if any, was given back to the queue; a restarted worker recovers. "
        "Any other non-zero status: Celery's consumer stopped on an error it could not recover from.",
    )
    _, celery_args = parser.parse_known_args(argv)
    return celery_args


def main(argv: list[str] | None = None) -> int:
    celery_args = parse_args(list(argv or []))
    configure_logging()
    from pydantic import ValidationError

    from models.failures import DeviceLost
    from models.memory import MemoryPlanError
    from models.settings import EngineSettings
    from models.speed import SpeedProfileError
    from models.user_loras import LoraFileError

    try:
        settings = WorkerSettings()
        engine_settings = EngineSettings()
    except ValidationError as exc:
        for error in exc.errors():
            name = "DREAMOMNI2_" + "_".join(map(str, error["loc"])).upper()
            logger.error("invalid setting %s: %s", name, error["msg"])
        return EXIT_CONFIG
    set_process_fields(worker=settings.worker_name)
    configure_tracing("dreamomni2-worker")
    from workers.tasks import JobTask

    runtime = WorkerRuntime(settings, engine_settings)
    try:
        runtime.start()
    except (MemoryPlanError, SpeedProfileError, LoraFileError) as exc:
        logger.error("refusing to start: %s", exc)
        runtime.stop()
        return EXIT_CONFIG
    except DeviceLost as exc:  # in the compiled profiles' warm-up
        runtime.exit_device_lost(exc)
    # Only now, with the models loaded, does this process take messages.
    JobTask.runtime = runtime
    try:
        runtime.celery.worker_main(
            [
                *celery_flags(settings.log_format),  # `celery`'s own options, before the sub-command
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "--prefetch-multiplier=1",
                # The front queue first: a requeued or resent job goes before new ones.
                f"--queues={settings.front_queue},{settings.queue}",
                f"--hostname={settings.worker_name}",
                "--without-gossip",
                "--without-mingle",
                "--loglevel=INFO",
                *celery_args,
            ]
        )
    finally:
        runtime.stop()
    # Celery's worker stops on a shutdown signal (0) or on an error it cannot recover from: the process
    # then ends with that status, to be replaced, instead of living on without a consumer.
    if code := CONSUMER.exit_code:
        logger.critical("the Celery consumer stopped for good (status %d); exiting to be replaced", code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Whether this process's Celery consumer is taking messages: for liveness, readiness and the exit code.

Celery's consumer can stop while its process lives on (an error it takes as unrecoverable, e.g. one
raised by the broker transport right after a reconnection): the process would then look alive and
consume nothing. Here the consumer's own blueprint says when it consumes (`Consuming`, a consumer
step started after the task consumer and stopped with it on every reconnection), `CONSUMER` keeps
that state for the process, and:

- liveness (`ConsumerState.healthy`) fails when the consumer has not consumed for `grace_s` although
  Redis answers (while Redis is away, waiting for it is what a consumer should do);
- readiness: a GPU worker announces `consuming`, and the gateway counts only consuming workers ready;
- `exit_code` is the Celery worker's own exit status once it stops, non-zero for an unrecoverable
  error, so the process ends with it and is replaced.

`Consumer` also reconnects promptly: Celery's consumer retries the broker at 2, 4, 6 ... up to 30 s
apart, so a worker could sit out half a minute after Redis returns; here at most 1 s apart (a
connection attempt to Redis costs next to nothing).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from celery import Celery, bootsteps, signals
from celery.worker import WorkController
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Connection

logger = logging.getLogger(__name__)

#: Seconds between the consumer's attempts to reach the broker, at most.
RECONNECT_INTERVAL_MAX_S = 1.0


class ConsumerState:
    """This process's consumer: consuming or not, since when, and the Celery worker it belongs to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.consuming = False
        self.since = time.monotonic()
        self.worker: WorkController | None = None
        self._listeners: list[Callable[[bool], None]] = []

    def set(self, consuming: bool) -> None:
        with self._lock:
            changed = consuming != self.consuming
            self.consuming = consuming
            if changed:
                self.since = time.monotonic()
            listeners = list(self._listeners)
        if changed:
            logger.info("consumer %s", "consuming" if consuming else "stopped consuming")
            for listener in listeners:
                try:
                    listener(consuming)
                except Exception:  # a listener's failure (Redis away) must not stop the consumer
                    logger.warning("consumer state listener failed", exc_info=True)

    def listen(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(consuming)` on every change (from the consumer's thread)."""
        with self._lock:
            self._listeners.append(listener)

    def healthy(self, redis_answers: bool, grace_s: float) -> tuple[bool, str]:
        """Whether the process should count as alive, and why not."""
        with self._lock:
            consuming, idle_s = self.consuming, time.monotonic() - self.since
        if consuming or not redis_answers or idle_s <= grace_s:
            return True, ""
        return False, f"the Celery consumer has not consumed for {idle_s:.0f}s although Redis answers"

    @property
    def exit_code(self) -> int:
        """The Celery worker's exit status once it has stopped (0 for a requested shutdown)."""
        code = getattr(self.worker, "exitcode", None)
        return int(code) if isinstance(code, int) else 0


#: The consumer of this process (one Celery worker per process).
CONSUMER = ConsumerState()


class Consuming(bootsteps.StartStopStep):
    """A consumer step: started once the task consumer is (every reconnection included), stopped
    with it."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: CeleryConsumer) -> None:
        CONSUMER.set(True)

    def stop(self, c: CeleryConsumer) -> None:
        CONSUMER.set(False)

    def shutdown(self, c: CeleryConsumer) -> None:
        CONSUMER.set(False)


class Consumer(CeleryConsumer):
    """Celery's consumer, retrying the broker at most `RECONNECT_INTERVAL_MAX_S` apart."""

    def ensure_connected(self, conn: Connection) -> Connection:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=0,
            interval_step=RECONNECT_INTERVAL_MAX_S / 2,
            interval_max=RECONNECT_INTERVAL_MAX_S,
        )
        return super().ensure_connected(conn)


def track_consumer(app: Celery) -> None:
    """Make `app`'s workers report their consumer in `CONSUMER` and reconnect promptly."""
    app.conf.worker_consumer = f"{__name__}:Consumer"
    app.steps["consumer"].add(Consuming)
    signals.worker_init.connect(_remember_worker, weak=False)


def _remember_worker(sender: WorkController, **_: object) -> None:
    CONSUMER.worker = sender


def consumer_grace_s(heartbeat_s: float) -> float:
    """How long a consumer may not consume while Redis answers before the process is unhealthy: a
    start or a reconnection takes seconds."""
    return max(30.0, 6 * heartbeat_s)


class LivenessFile:
    """The file a liveness probe reads (`python -m workers.health`): touched on each `beat` while the
    consumer is healthy; a consumer that stopped for good lets it age, and the probe fails."""

    def __init__(self, path: Path, grace_s: float):
        self.path, self.grace_s = path, grace_s
        self._failing = False

    def beat(self, redis_answers: bool) -> None:
        healthy, why = CONSUMER.healthy(redis_answers, self.grace_s)
        if healthy:
            self.path.touch()
        elif not self._failing:
            logger.error("%s; liveness withheld", why)
        self._failing = not healthy

"""The service's state in Redis, split by concern: jobs, idempotency keys, webhook deliveries, workers.

Celery and the store divide the work. Celery is the transport and the worker lifecycle: it carries a
job id to one worker process (acks late, prefetch 1, redelivery after the visibility timeout) and
starts and stops workers. It never holds a job's state. The store is the job lifecycle: a job's
record, inputs and result; its status changes, each atomic (Lua) and guarded by the running attempt's
token; the lease a worker's heartbeat renews; and the reaper that requeues a job whose lease lapsed
(its worker died), counting attempts. So a message delivered twice runs once (only a queued job is
claimed), a dead worker's job runs again within a lease and a reaper interval (not a visibility
timeout), and a run that lost its lease can never overwrite the run that replaced it.

Keys (under the configured prefix; a job's keys all expire with its TTL):
  job:{id}          hash: a `JobRecord` (status, owner, spec, timestamps, progress, metadata, ...)
  job:{id}:images   hash: image number -> uploaded bytes (deleted once the job ends)
  job:{id}:result   the encoded output image
  job:{id}:events   stream: queued, started, progress, and one final succeeded | failed | canceled
  lease:{id}        the running attempt's token, kept alive by the worker's heartbeat
  queue, running    queued ids by arrival (queue positions); running ids (what the reaper checks)
  deadlines         queued ids by deadline (swept by the gateways)
  idem:{hash}       an Idempotency-Key's request fingerprint and job id
  webhook:{id}      a webhook delivery: its fixed body, owner, URL and attempts
  webhooks:due      delivery ids waiting to be retried, by when the next attempt is due
  worker:{name}     a worker's readiness info, kept alive by its heartbeat

The store reports outcomes (`workers.store.outcomes`); the callers (the gateway's service, the worker
runtime) decide what they mean and raise the API's errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from workers.store.connection import RedisTarget
from workers.store.deliveries import ClaimedRetries, Deliveries
from workers.store.idempotency import IdempotencyKeys
from workers.store.jobs import Event, JobStore, parse_events
from workers.store.keys import Keys
from workers.store.outcomes import (
    CancelOutcome,
    Claim,
    ClaimOutcome,
    DiscardOutcome,
    RequeueOutcome,
    Reservation,
    ReservationResult,
)
from workers.store.quotas import Quotas
from workers.store.registry import WorkerRegistry

if TYPE_CHECKING:
    from workers.config import ServiceSettings

__all__ = [
    "CancelOutcome",
    "Claim",
    "ClaimOutcome",
    "ClaimedRetries",
    "Deliveries",
    "DiscardOutcome",
    "Event",
    "IdempotencyKeys",
    "JobStore",
    "Keys",
    "RedisTarget",
    "RequeueOutcome",
    "Reservation",
    "ReservationResult",
    "Store",
    "WorkerRegistry",
    "parse_events",
]


@dataclass(frozen=True)
class Store:
    """All of it, on one Redis connection pool and one key prefix."""

    redis: redis.Redis
    keys: Keys
    jobs: JobStore
    idempotency: IdempotencyKeys
    quotas: Quotas
    deliveries: Deliveries
    workers: WorkerRegistry

    @classmethod
    def connect(cls, client: redis.Redis, prefix: str = "do2") -> Store:
        keys = Keys(prefix)
        return cls(
            redis=client,
            keys=keys,
            jobs=JobStore(client, keys),
            idempotency=IdempotencyKeys(client, keys),
            quotas=Quotas(client, keys),
            deliveries=Deliveries(client, keys),
            workers=WorkerRegistry(client, keys),
        )

    @classmethod
    def from_settings(cls, settings: ServiceSettings, max_connections: int | None = None) -> Store:
        """The store every process of the service uses: on the Redis its settings name (a URL, or the
        sentinels' primary), under its key prefix. With `max_connections`, see `RedisTarget.client`."""
        return cls.connect(settings.redis_target.client(max_connections), settings.redis_prefix)

    @classmethod
    def from_url(cls, url: str, prefix: str = "do2", max_connections: int | None = None) -> Store:
        """A store on `url` (tools and tests; the service's processes use `from_settings`)."""
        return cls.connect(RedisTarget(url).client(max_connections), prefix)

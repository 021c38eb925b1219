"""Quotas, enforced atomically in Redis: submissions per second per key (a token bucket), jobs queued
or running per key, and the depth of the whole queue."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum

import redis

from workers.store.keys import Keys, script


class Refusal(IntEnum):
    """The `admit.lua` outcome codes."""

    ADMITTED = 0
    RATE = 1
    ACTIVE_JOBS = 2
    QUEUE_FULL = 3


@dataclass(frozen=True)
class Limits:
    """One key's limits: `rate` submissions per second on average, bursts of `burst`, at most
    `active` jobs queued or running at once."""

    rate: float
    burst: int
    active: int


@dataclass(frozen=True)
class Admission:
    refusal: Refusal
    #: ADMITTED: whole tokens left; RATE: milliseconds until one is back; ACTIVE_JOBS: the count;
    #: QUEUE_FULL: the depth.
    value: int


class Quotas:
    """Admit a submission under its key's limits and the global queue cap, or say which limit."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys
        self._admit = script(client, "admit")

    def admit(self, owner: str, job_id: str, limits: Limits, max_queue_depth: int, ttl_s: int) -> Admission:
        """Take a token and a job slot for `job_id` (new), or report the limit that refuses it."""
        k = self.keys
        keys = [k.rate_bucket(owner), k.active_jobs(owner), k.queue]
        args = [job_id, repr(time.time()), limits.rate, limits.burst, limits.active, max_queue_depth,
                k.job(""), ttl_s]  # fmt: skip
        refusal, value = self._admit(keys=keys, args=args)
        return Admission(Refusal(int(refusal)), int(value))

    def release(self, owner: str, job_id: str) -> None:
        """Give back the job slot of a submission that did not become a job."""
        self.redis.srem(self.keys.active_jobs(owner), job_id)

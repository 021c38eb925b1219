"""Idempotency-Key reservations: one job per (owner, key, request body)."""

from __future__ import annotations

import json
import time

import redis

from workers.store.keys import Keys
from workers.store.outcomes import Reservation, ReservationResult

#: How long a second request waits for the first request with its key to finish creating the job.
WAIT_FOR_FIRST_S = 5.0
#: How long a reservation with no job yet holds its key. Creating a job takes milliseconds; a
#: reservation this old belongs to a gateway that died before storing the job, so the key frees
#: itself and the client's retry creates the job.
RESERVATION_TTL_S = 15
POLL_S = 0.05


class IdempotencyKeys:
    """Reserve a key for a request's fingerprint, then record the job it made (or release it)."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys

    def reserve(self, owner: str, key: str, fingerprint: str, ttl_s: int) -> ReservationResult:
        """Claim `key` for a request with `fingerprint`, or report why not.

        The claim lasts `RESERVATION_TTL_S` until `complete` records the job (for `ttl_s`)."""
        name = self.keys.idempotency(owner, key)
        deadline = time.monotonic() + WAIT_FOR_FIRST_S
        while True:
            held = json.dumps({"fingerprint": fingerprint, "job_id": ""})
            if self.redis.set(name, held, nx=True, ex=min(ttl_s, RESERVATION_TTL_S)):
                return ReservationResult(Reservation.NEW)
            raw = self.redis.get(name)
            if raw is None:  # the first request failed and released the key: try again to take it
                continue
            held = json.loads(raw)
            if held["fingerprint"] != fingerprint:
                return ReservationResult(Reservation.BODY_MISMATCH)
            if held["job_id"]:
                return ReservationResult(Reservation.REPLAY, held["job_id"])
            if time.monotonic() > deadline:
                return ReservationResult(Reservation.IN_PROGRESS)
            time.sleep(POLL_S)

    def complete(
        self,
        owner: str,
        key: str,
        fingerprint: str,
        job_id: str,
        ttl_s: int,
        pipe: redis.client.Pipeline | None = None,
    ) -> None:
        """Record the job `key` made; on `pipe`, in the transaction that stores the job, so that a
        gateway dying in between cannot leave a job its key does not name."""
        payload = json.dumps({"fingerprint": fingerprint, "job_id": job_id})
        (pipe or self.redis).set(self.keys.idempotency(owner, key), payload, ex=ttl_s)

    def release(self, owner: str, key: str) -> None:
        self.redis.delete(self.keys.idempotency(owner, key))

"""What the store's state changes report back. The store says what happened; callers decide what
that means for the caller of the API (the service raises the `ServiceError`s)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class ClaimOutcome(StrEnum):
    """A worker's attempt to take a job: claimed, or why not (the status the job was in)."""

    CLAIMED = "claimed"
    MISSING = "missing"
    DEADLINE = "deadline"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class CancelOutcome(StrEnum):
    """A cancel: the queued job was dequeued, the running one flagged, or the state it was in."""

    DEQUEUED = "dequeued"
    CANCEL_REQUESTED = "cancel_requested"
    MISSING = "missing"
    QUEUED = "queued"  # a deadline sweep found the deadline not due yet
    RUNNING = "running"  # a deadline sweep found the job started: deadlines apply only to queued jobs
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in (CancelOutcome.SUCCEEDED, CancelOutcome.FAILED, CancelOutcome.CANCELED)


class DiscardOutcome(StrEnum):
    """Deleting a job whose write did not reach its replicas (`JobStore.discard`)."""

    DELETED = "deleted"  # it was queued, untouched: now nothing is stored
    MISSING = "missing"  # nothing was stored (lost already): nothing is stored either
    TAKEN = "taken"  # a worker claimed it meanwhile: it exists, and stays


class RequeueOutcome(IntEnum):
    """What the reaper did with a running job whose lease lapsed (the Lua script's return value)."""

    NOTHING = 0
    REQUEUED = 1  # queued again: the caller sends a new message
    FAILED = 2  # out of attempts: failed with worker_lost


class Reservation(StrEnum):
    """Reserving an Idempotency-Key for a request."""

    NEW = "new"  # this request is the first: create the job, then `complete` the key
    REPLAY = "replay"  # an earlier request with the same key and body made `job_id`
    BODY_MISMATCH = "body_mismatch"  # the key was used with a different body
    IN_PROGRESS = "in_progress"  # the first request with the key is still creating its job


@dataclass(frozen=True)
class ReservationResult:
    outcome: Reservation
    job_id: str | None = None


@dataclass(frozen=True)
class Claim:
    """What a worker got when it tried to take a job."""

    outcome: ClaimOutcome
    attempt: int
    token: str

    @property
    def claimed(self) -> bool:
        return self.outcome is ClaimOutcome.CLAIMED

"""Jobs: their records, inputs, results, leases and events, and every state change of a job.

State changes that must not race (claim, progress, finish, release, requeue, cancel) are Lua scripts
(`lua/`): each checks the run token, so a run that lost its lease can never overwrite the run that
replaced it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from api_schemas.api import ErrorInfo, JobStatus, Progress, ProgressEvent
from api_schemas.errors import ErrorCode
from api_schemas.jobs import JobMetadata
from api_schemas.records import JobRecord, JobSpec, StoredResult
from workers.store.keys import EVENTS_MAXLEN, FALLBACK_TTL_S, Keys, script
from workers.store.outcomes import CancelOutcome, Claim, ClaimOutcome, DiscardOutcome, RequeueOutcome

#: Events read per stream read.
EVENTS_PER_READ = 100
#: Longest single blocking read, well under redis-py's default 5 s socket timeout (a longer block
#: reads as Redis being down).
MAX_BLOCK_S = 2.0


@dataclass(frozen=True)
class Event:
    """One entry of a job's event stream."""

    id: str
    type: str
    data: dict[str, Any]


def new_job_id() -> str:
    return f"j_{uuid.uuid4().hex}"


def parse_events(reply: list | None) -> list[Event]:
    """Events out of an XREAD reply."""
    events = []
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            events.append(
                Event(
                    id=entry_id.decode(),
                    type=fields[b"type"].decode(),
                    data=json.loads(fields.get(b"data", b"{}") or b"{}"),
                )
            )
    return events


def _error_json(code: ErrorCode, message: str) -> str:
    return ErrorInfo(code=code.value, message=message).model_dump_json(exclude_none=True)


class JobStore:
    """Every read and write of a job's state, for the gateway and the workers alike."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys
        self._claim = script(client, "claim")
        self._renew = script(client, "renew")
        self._progress = script(client, "progress")
        self._finish = script(client, "finish")
        self._requeue = script(client, "requeue_lost")
        self._release = script(client, "release")
        self._cancel = script(client, "cancel")
        self._discard = script(client, "discard")

    # Gateway side ---------------------------------------------------------------------------------
    def create(
        self,
        *,
        owner: str,
        spec: JobSpec,
        images: list[bytes],
        ttl_s: int,
        deadline_s: float | None = None,
        job_id: str | None = None,
        also: Callable[[redis.client.Pipeline, str], None] | None = None,
        request_id: str | None = None,
        traceparent: str | None = None,
    ) -> JobRecord:
        """Store a new queued job and its inputs atomically; the caller then sends its message.

        With `deadline_s`, a job not started that many seconds after now ends canceled unrun.
        `also(pipe, job_id)` adds writes to the same transaction (the Idempotency-Key's record).
        `request_id` and `traceparent` (the submit request's) are kept for the worker's logs and trace.
        """
        job_id = job_id or new_job_id()
        now = time.time()
        k = self.keys
        seq = self.redis.incr(k.sequence)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            k.job(job_id),
            mapping={
                "id": job_id,
                "owner": owner,
                "status": JobStatus.QUEUED.value,
                "spec": spec.model_dump_json(),
                "created_at": repr(now),
                "ttl_s": ttl_s,
                "attempts": 0,
                "seq": seq,  # its place in line, kept for a requeue
                "deadline_at": repr(now + deadline_s) if deadline_s is not None else "",
                "request_id": request_id or "",
                "traceparent": traceparent or "",
            },
        )
        pipe.expire(k.job(job_id), ttl_s)
        if deadline_s is not None:
            pipe.zadd(k.deadlines, {job_id: now + deadline_s})
        if images:
            pipe.hset(k.images(job_id), mapping={str(n): data for n, data in enumerate(images, start=1)})
            pipe.expire(k.images(job_id), ttl_s)
        pipe.zadd(k.queue, {job_id: seq})
        pipe.xadd(k.events(job_id), {"type": "queued", "data": "{}"}, maxlen=EVENTS_MAXLEN, approximate=True)
        pipe.expire(k.events(job_id), ttl_s)
        if also is not None:
            also(pipe, job_id)
        pipe.execute()
        record = self.get(job_id)
        assert record is not None, "written in the transaction above"
        return record

    def replicate(self, job_id: str, ttl_s: int, replicas: int, timeout_ms: int) -> int:
        """Wait until the job as `create` stored it has reached `replicas` replicas, or `timeout_ms`
        passed (Redis WAIT); returns how many replicas have it (0 when the job is gone)."""
        # WAIT counts the writes made on its own connection, and `create`'s transaction may have gone
        # through another one of the pool: a write of the job's on WAIT's connection, after that
        # transaction, stands for it (replicas apply writes in order).
        pipe = self.redis.pipeline(transaction=False)
        pipe.expire(self.keys.job(job_id), ttl_s)
        pipe.execute_command("WAIT", replicas, timeout_ms)
        renewed, reached = pipe.execute()
        return int(reached) if renewed else 0

    def discard(self, job_id: str, owner: str, also_delete: Sequence[str] = ()) -> DiscardOutcome:
        """Delete a job `create` stored and nothing has taken, with its place in the queue and its
        owner's job slot (and the keys `also_delete`), as if it had never been submitted."""
        k = self.keys
        keys = [k.job(job_id), k.images(job_id), k.events(job_id), k.queue, k.deadlines, k.active_jobs(owner)]
        return DiscardOutcome(self._discard(keys=[*keys, *also_delete], args=[job_id]).decode())

    def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when it never existed or has expired."""
        raw = self.redis.hgetall(self.keys.job(job_id)) if job_id.startswith("j_") else {}
        if not raw or b"status" not in raw:
            return None
        return JobRecord.from_hash(raw)

    def queue_position(self, job_id: str) -> int | None:
        rank = self.redis.zrank(self.keys.queue, job_id)
        return None if rank is None else rank + 1

    def queue_depth(self) -> int:
        return int(self.redis.zcard(self.keys.queue))

    def result(self, job_id: str, index: int = 0) -> bytes | None:
        return self.redis.get(self.keys.result(job_id, index))

    def events(self, job_id: str, after: str = "0-0", block_ms: int | None = None) -> list[Event]:
        """Events after the id `after`; with `block_ms`, wait up to that long for the first one."""
        reply = self.redis.xread({self.keys.events(job_id): after}, block=block_ms, count=EVENTS_PER_READ)
        return parse_events(reply)

    def wait_until_terminal(self, job_id: str, timeout_s: float) -> JobRecord | None:
        """Block until the job ends or `timeout_s` passes; the job as it is then (None: it expired)."""
        deadline = time.monotonic() + timeout_s
        last = "0-0"
        while True:
            record = self.get(job_id)
            if record is None or record.status.is_terminal():
                return record
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return record
            events = self.events(job_id, after=last, block_ms=max(1, int(min(remaining, MAX_BLOCK_S) * 1000)))
            if events:
                last = events[-1].id

    def cancel(self, job_id: str, *, reason: str = "requested", message: str | None = None) -> CancelOutcome:
        """Cancel a job: a queued one ends canceled unrun, a running one stops at its next step."""
        message = message or "Canceled at the caller's request."
        return self._cancel_script(
            job_id, reason, _error_json(ErrorCode.CANCELED, message), deadline_only=False
        )

    def expire_deadline(self, job_id: str) -> bool:
        """Cancel a queued job whose deadline passed; True when this call canceled it."""
        error = _error_json(
            ErrorCode.DEADLINE,
            "No worker started the job before its deadline; it was canceled without running.",
        )
        return self._cancel_script(job_id, "deadline", error, deadline_only=True) is CancelOutcome.DEQUEUED

    def _cancel_script(self, job_id: str, reason: str, error: str, *, deadline_only: bool) -> CancelOutcome:
        k = self.keys
        keys = [k.job(job_id), k.queue, k.images(job_id), k.events(job_id), k.deadlines]
        args = [
            job_id,
            repr(time.time()),
            error,
            reason,
            "1" if deadline_only else "0",
            FALLBACK_TTL_S,
            EVENTS_MAXLEN,
        ]
        return CancelOutcome(self._cancel(keys=keys, args=args).decode())

    def due_deadlines(self) -> list[str]:
        """Ids of jobs whose deadline has passed (queued or not; `expire_deadline` sorts them out)."""
        return [raw.decode() for raw in self.redis.zrangebyscore(self.keys.deadlines, "-inf", time.time())]

    # Worker side ----------------------------------------------------------------------------------
    def claim(self, job_id: str, *, worker: str, lease_ttl_s: float) -> Claim:
        """Take a queued job for this worker; any other state means the message is stale."""
        token = uuid.uuid4().hex
        k = self.keys
        keys = [k.job(job_id), k.lease(job_id), k.queue, k.running, k.events(job_id)]
        args = [job_id, token, repr(time.time()), lease_ttl_s, worker, EVENTS_MAXLEN]
        outcome, attempt = self._claim(keys=keys, args=args)
        return Claim(outcome=ClaimOutcome(outcome.decode()), attempt=int(attempt), token=token)

    def renew_lease(self, job_id: str, token: str, lease_ttl_s: float) -> bool:
        keys = [self.keys.lease(job_id), self.keys.job(job_id)]
        return bool(self._renew(keys=keys, args=[token, lease_ttl_s]))

    def release(self, job_id: str, token: str) -> bool:
        """Give this run's job back now, unfinished: its worker cannot run it (a GPU that failed for good).

        Drops the run's lease and writes no outcome, so the job is left as a dead worker's: the reapers'
        next pass (`requeue_lost`) requeues it, its attempt counted, or fails it `worker_lost` once out
        of attempts. The caller must have stopped renewing the lease first: a renewal would take it
        back. False when the lease is gone already or another run's (nothing changed)."""
        keys = [self.keys.lease(job_id), self.keys.job(job_id)]
        return bool(self._release(keys=keys, args=[token]))

    def images(self, job_id: str) -> list[bytes]:
        raw = self.redis.hgetall(self.keys.images(job_id))
        return [raw[k] for k in sorted(raw, key=int)]

    def progress(self, job_id: str, token: str, progress: Progress | ProgressEvent) -> bool:
        """Record this run's progress; False (and nothing written) when another run owns the job now.

        The job keeps the latest progress without its preview, so that reading a job stays small; the
        event stream gets the whole event, a preview (a few KB) on every DREAMOMNI2_PREVIEW_EVERY-th
        denoising step: at most steps / that many of them per job, gone with the job's other keys."""
        kept = progress.model_dump_json(include=set(Progress.model_fields))
        previewed = isinstance(progress, ProgressEvent) and progress.preview
        event = progress.model_dump_json() if previewed else kept
        keys = [self.keys.job(job_id), self.keys.events(job_id)]
        return bool(self._progress(keys=keys, args=[token, kept, EVENTS_MAXLEN, event]))

    def finish(
        self,
        job_id: str,
        token: str,
        status: JobStatus,
        *,
        ttl_s: int,
        metadata: JobMetadata | None = None,
        error: ErrorInfo | None = None,
        results: Sequence[tuple[StoredResult, bytes]] = (),
    ) -> bool:
        """End this run's job; False (and nothing written) when another run owns the job now.

        `results`: the result images (most jobs have one; a Feature Mixing pair, two), each its
        description and its bytes, stored under `Keys.result(job_id, index)`."""
        fields: dict[str, str] = {"finished_at": repr(time.time())}
        if metadata is not None:
            fields["metadata"] = metadata.model_dump_json()
        if error is not None:
            fields["error"] = error.model_dump_json(exclude_none=True)
        if results:
            fields["result"] = results[0][0].model_dump_json()
            fields["results"] = json.dumps([info.model_dump() for info, _ in results])
        k = self.keys
        keys = [k.job(job_id), k.lease(job_id), k.running, k.images(job_id), k.events(job_id)]
        keys += [k.result(job_id, index) for index in range(len(results))]
        event = fields.get("error", "{}")
        args: list[Any] = [token, status.value, ttl_s, event, EVENTS_MAXLEN, len(results)]
        args += [data for _, data in results]
        for name, value in fields.items():
            args += [name, value]
        return bool(self._finish(keys=keys, args=args))

    def requeue_lost(
        self, max_attempts: int, restart_grace_s: float = 0.0
    ) -> list[tuple[str, RequeueOutcome]]:
        """Requeue running jobs whose lease lapsed (their worker died); fail those out of attempts.

        Within `restart_grace_s` of Redis starting, nothing is requeued: every lease may have lapsed
        while Redis was away, and the runs that are alive take theirs back at their next heartbeat."""
        outcomes: list[tuple[str, RequeueOutcome]] = []
        if restart_grace_s and int(self.redis.info("server")["uptime_in_seconds"]) < restart_grace_s:
            return outcomes
        k = self.keys
        error = _error_json(
            ErrorCode.WORKER_LOST,
            f"The worker running this job stopped responding {max_attempts} times; "
            "the job was not retried again.",
        )
        for raw_id in self.redis.smembers(k.running):
            job_id = raw_id.decode()
            seq = self.redis.incr(k.sequence)
            keys = [k.job(job_id), k.lease(job_id), k.queue, k.running, k.events(job_id), k.images(job_id)]
            args = [job_id, seq, repr(time.time()), max_attempts, error, FALLBACK_TTL_S, EVENTS_MAXLEN]
            outcome = RequeueOutcome(int(self._requeue(keys=keys, args=args)))
            if outcome is not RequeueOutcome.NOTHING:
                outcomes.append((job_id, outcome))
        return outcomes

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.keys.job(job_id), "cancel_requested") == b"1"

    def queued_ids(self) -> list[str]:
        """The queued jobs, first in line first."""
        return [job_id.decode() for job_id in self.redis.zrange(self.keys.queue, 0, -1)]

    def lock_resend(self, job_id: str, ttl_s: float) -> bool:
        """True for the one caller that may resend `job_id`'s message now (the others skip it)."""
        return bool(self.redis.set(self.keys.resend(job_id), "1", nx=True, px=int(ttl_s * 1000)))

    def prune_queue(self) -> int:
        """Drop queue entries whose job expired while waiting (no worker took it within its TTL)."""
        stale = [
            job_id
            for job_id in self.redis.zrange(self.keys.queue, 0, -1)
            if not self.redis.exists(self.keys.job(job_id.decode()))
        ]
        return self.redis.zrem(self.keys.queue, *stale) if stale else 0

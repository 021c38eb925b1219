"""Jobs, their inputs, results, leases and events in Redis: the one state every process shares.

Keys (all under the configured prefix, all expiring with the job's TTL):
  job:{id}          hash: status, owner, spec, timestamps, progress, metadata, error, result, run token
  job:{id}:images   hash: image number -> uploaded bytes (deleted once the job ends)
  job:{id}:result   the encoded output image
  job:{id}:events   stream: queued, started, progress, and one final succeeded | failed | canceled
  lease:{id}        the running attempt's token, kept alive by the worker's heartbeat
  queue             sorted set of queued job ids (queue positions)
  running           set of running job ids (what the reaper checks)
  worker:{name}     a worker's liveness and readiness, kept alive by its heartbeat

State changes that must not race (claim, finish, requeue) are Lua scripts: each checks the run token,
so a run that lost its lease can never overwrite the run that replaced it.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from api_schemas.api import JobStatus
from api_schemas.errors import Conflict, InvalidInput, NotFound

# KEYS: job, lease, queue, running, events. ARGV: id, token, now, lease_ttl, worker.
_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
-- Only queued jobs: a running one whose worker died is requeued by the reaper, which counts attempts.
if status ~= 'queued' then return {status, 0} end
local deadline = redis.call('HGET', KEYS[1], 'deadline_at')
if deadline and deadline ~= '' and tonumber(deadline) < tonumber(ARGV[3]) then return {'deadline', 0} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') + 1
redis.call('HSET', KEYS[1], 'status', 'running', 'run_token', ARGV[2], 'started_at', ARGV[3],
  'worker', ARGV[5], 'attempts', attempts, 'progress', '{}')
redis.call('SET', KEYS[2], ARGV[2], 'PX', math.floor(tonumber(ARGV[4]) * 1000))
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', 10000, '*', 'type', 'started', 'data',
  cjson.encode({attempt = attempts}))
return {'claimed', attempts}
"""

# KEYS: lease. ARGV: token, lease_ttl.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[2]) * 1000))
end
return 0
"""

# KEYS: job, events. ARGV: token, progress json.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'run_token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', 'type', 'progress', 'data', ARGV[2])
return 1
"""

# KEYS: job, lease, running, result, images, events. ARGV: token, status, ttl, event data, result
# bytes ('' for none), then field/value pairs to set on the job.
_FINISH = """
local owner = redis.call('HGET', KEYS[1], 'run_token')
if owner ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'run_token', '')
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[5] ~= '' then redis.call('SET', KEYS[4], ARGV[5], 'EX', ttl) end
redis.call('DEL', KEYS[2], KEYS[5])
redis.call('SREM', KEYS[3], redis.call('HGET', KEYS[1], 'id'))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('XADD', KEYS[6], 'MAXLEN', '~', 10000, '*', 'type', ARGV[2], 'data', ARGV[4])
redis.call('EXPIRE', KEYS[6], ttl)
return 1
"""

# KEYS: job, lease, queue, running, events, images. ARGV: id, seq, now, max_attempts, error json.
_REQUEUE_IF_LOST = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then redis.call('SREM', KEYS[4], ARGV[1]) return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SREM', KEYS[4], ARGV[1])
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl_s') or '86400')
if attempts >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'run_token', '', 'finished_at', ARGV[3], 'error', ARGV[5])
  redis.call('DEL', KEYS[6])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', 10000, '*', 'type', 'failed', 'data', ARGV[5])
  return 2
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'run_token', '', 'progress', '{}')
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', 10000, '*', 'type', 'queued', 'data',
  cjson.encode({reason = 'worker_lost', attempts = attempts}))
return 1
"""


# KEYS: job, queue, images, events, deadlines. ARGV: id, now, error json, reason, deadline-only flag.
# A queued job ends canceled at once; a running one is flagged and stops at its next step.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if ARGV[5] == '1' then
  local deadline = redis.call('HGET', KEYS[1], 'deadline_at')
  -- Not due yet on this clock: keep the entry for a later sweep.
  if status == 'queued' and deadline and deadline ~= '' and tonumber(deadline) > tonumber(ARGV[2]) then
    return status
  end
  redis.call('ZREM', KEYS[5], ARGV[1])
  if status ~= 'queued' or not deadline or deadline == '' then return status end
end
if status == 'queued' then
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl_s') or '86400')
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[2], 'error', ARGV[3],
    'cancel_reason', ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('DEL', KEYS[3])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', 10000, '*', 'type', 'canceled', 'data', ARGV[3])
  redis.call('EXPIRE', KEYS[4], ttl)
  -- Not 'canceled': that is what an already canceled job answers, and only this call may notify.
  return 'dequeued'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'cancel_reason', ARGV[4])
  return 'cancel_requested'
end
return status
"""

# KEYS: delivery, job. ARGV: attempts, delivery summary json. The job may have expired meanwhile:
# writing to it then would leave a partial hash without a TTL.
_DELIVERY_ATTEMPT = """
redis.call('HSET', KEYS[1], 'attempts', ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[2], 'webhook', ARGV[2]) end
return 1
"""


@dataclass
class JobRecord:
    """A job as stored: the raw fields, decoded."""

    id: str
    owner: str
    status: JobStatus
    spec: dict[str, Any]
    created_at: float
    ttl_s: int
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    deadline_at: float | None = None
    cancel_requested: bool = False
    cancel_reason: str | None = None
    webhook: dict[str, Any] | None = None

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> JobRecord:
        h = {k.decode(): v.decode() for k, v in raw.items() if k != b"_"}

        def number(name: str) -> float | None:
            return float(h[name]) if h.get(name) else None

        def obj(name: str) -> dict[str, Any] | None:
            return json.loads(h[name]) if h.get(name) else None

        return cls(
            id=h["id"],
            owner=h.get("owner", ""),
            status=JobStatus(h["status"]),
            spec=json.loads(h["spec"]),
            created_at=float(h["created_at"]),
            ttl_s=int(h.get("ttl_s", "86400")),
            attempts=int(h.get("attempts", "0")),
            started_at=number("started_at"),
            finished_at=number("finished_at"),
            worker=h.get("worker") or None,
            progress=obj("progress") or {},
            metadata=obj("metadata"),
            error=obj("error"),
            result=obj("result"),
            deadline_at=number("deadline_at"),
            cancel_requested=h.get("cancel_requested") == "1",
            cancel_reason=h.get("cancel_reason") or None,
            webhook=obj("webhook"),
        )


@dataclass(frozen=True)
class Claim:
    """What a worker got when it tried to take a job."""

    outcome: str  # claimed, missing, or the status the job was in
    attempt: int
    token: str

    @property
    def claimed(self) -> bool:
        return self.outcome == "claimed"


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    data: dict[str, Any]


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


class JobStore:
    """Every read and write of job state, for the gateway and the workers alike."""

    def __init__(self, client: redis.Redis, prefix: str = "do2"):
        self.redis = client
        self.prefix = prefix
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._progress = client.register_script(_PROGRESS)
        self._finish = client.register_script(_FINISH)
        self._requeue = client.register_script(_REQUEUE_IF_LOST)
        self._cancel = client.register_script(_CANCEL)
        self._delivery_attempt = client.register_script(_DELIVERY_ATTEMPT)

    @classmethod
    def from_url(cls, url: str, prefix: str = "do2") -> JobStore:
        client = redis.Redis.from_url(url, health_check_interval=30, socket_keepalive=True)
        return cls(client, prefix)

    # Keys ------------------------------------------------------------------------------------------
    def _job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _images(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:images"

    def _result(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:result"

    def _events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def events_key(self, job_id: str) -> str:
        """The Redis stream of a job's events (for readers with their own, e.g. async, client)."""
        return self._events(job_id)

    def _lease(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    @property
    def _queue(self) -> str:
        return f"{self.prefix}:queue"

    @property
    def _running(self) -> str:
        return f"{self.prefix}:running"

    def _worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    @property
    def _deadlines(self) -> str:
        return f"{self.prefix}:deadlines"

    def _delivery(self, delivery_id: str) -> str:
        return f"{self.prefix}:webhook:{delivery_id}"

    def _idempotency(self, owner: str, key: str) -> str:
        digest = hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()
        return f"{self.prefix}:idem:{digest}"

    # Gateway side ---------------------------------------------------------------------------------
    def create(
        self,
        *,
        owner: str,
        spec: dict[str, Any],
        images: list[bytes],
        ttl_s: int,
        deadline_s: float | None = None,
    ) -> JobRecord:
        """Store a new queued job and its inputs atomically; the caller then sends its message.

        With `deadline_s`, a job not started that many seconds after now ends canceled unrun.
        """
        job_id = f"j_{uuid.uuid4().hex}"
        now = time.time()
        seq = self.redis.incr(f"{self.prefix}:seq")
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self._job(job_id),
            mapping={
                "id": job_id,
                "owner": owner,
                "status": JobStatus.QUEUED.value,
                "spec": json.dumps(spec),
                "created_at": repr(now),
                "ttl_s": ttl_s,
                "attempts": 0,
                "deadline_at": repr(now + deadline_s) if deadline_s is not None else "",
            },
        )
        pipe.expire(self._job(job_id), ttl_s)
        if deadline_s is not None:
            pipe.zadd(self._deadlines, {job_id: now + deadline_s})
        if images:
            pipe.hset(self._images(job_id), mapping={str(n): data for n, data in enumerate(images, start=1)})
            pipe.expire(self._images(job_id), ttl_s)
        pipe.zadd(self._queue, {job_id: seq})
        pipe.xadd(self._events(job_id), {"type": "queued", "data": "{}"}, maxlen=10000, approximate=True)
        pipe.expire(self._events(job_id), ttl_s)
        pipe.execute()
        return self.get(job_id)

    def get(self, job_id: str, owner: str | None = None) -> JobRecord:
        """The job, or `NotFound` when it never existed, expired, or belongs to another owner."""
        raw = self.redis.hgetall(self._job(job_id)) if job_id.startswith("j_") else {}
        if not raw or b"status" not in raw:
            raise NotFound(f"No job {job_id!r}: it does not exist or has expired.", code="job_not_found")
        record = JobRecord.from_hash(raw)
        if owner is not None and record.owner != owner:
            # Same answer as a missing job: another key's ids are not even confirmed to exist.
            raise NotFound(f"No job {job_id!r}: it does not exist or has expired.", code="job_not_found")
        return record

    def queue_position(self, job_id: str) -> int | None:
        rank = self.redis.zrank(self._queue, job_id)
        return None if rank is None else rank + 1

    def queue_depth(self) -> int:
        return int(self.redis.zcard(self._queue))

    def result(self, job_id: str) -> bytes | None:
        return self.redis.get(self._result(job_id))

    def fail_unsent(self, job_id: str, message: str) -> None:
        """Mark a job failed whose queue message could not be sent, so it is not left queued forever."""
        error = json.dumps({"code": "queue_unavailable", "message": message})
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self._job(job_id), mapping={"status": "failed", "finished_at": repr(time.time()), "error": error}
        )
        pipe.zrem(self._queue, job_id)
        pipe.delete(self._images(job_id))
        pipe.xadd(self._events(job_id), {"type": "failed", "data": error}, maxlen=10000, approximate=True)
        pipe.execute()

    def events(self, job_id: str, after: str = "0-0", block_ms: int | None = None) -> list[Event]:
        """Events after the id `after`; with `block_ms`, wait up to that long for the first one."""
        reply = self.redis.xread({self._events(job_id): after}, block=block_ms, count=100)
        return parse_events(reply)

    def wait_until_terminal(self, job_id: str, timeout_s: float) -> JobRecord:
        """Block until the job ends or `timeout_s` passes; returns the job as it is then."""
        deadline = time.monotonic() + timeout_s
        last = "0-0"
        while True:
            record = self.get(job_id)
            if record.status.is_terminal():
                return record
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return record
            # Well under redis-py's default 5 s socket timeout: a longer block reads as Redis being down.
            events = self.events(job_id, after=last, block_ms=max(1, int(min(remaining, 2.0) * 1000)))
            if events:
                last = events[-1].id

    def cancel(self, job_id: str, *, reason: str = "requested", message: str | None = None) -> str:
        """Cancel a job: `dequeued` (it was queued and is now canceled, unrun), `cancel_requested`
        (running: stops at its next step), `missing`, or the terminal status it already had."""
        error = {"code": "canceled", "message": message or "Canceled at the caller's request."}
        return self._cancel_script(job_id, reason, error, deadline_only=False)

    def expire_deadline(self, job_id: str) -> bool:
        """Cancel a queued job whose deadline passed; True when this call canceled it."""
        error = {
            "code": "deadline",
            "message": "No worker started the job before its deadline; it was canceled without running.",
        }
        return self._cancel_script(job_id, "deadline", error, deadline_only=True) == "dequeued"

    def _cancel_script(self, job_id: str, reason: str, error: dict[str, str], *, deadline_only: bool) -> str:
        keys = [self._job(job_id), self._queue, self._images(job_id), self._events(job_id), self._deadlines]
        args = [job_id, repr(time.time()), json.dumps(error), reason, "1" if deadline_only else "0"]
        return self._cancel(keys=keys, args=args).decode()

    def due_deadlines(self) -> list[str]:
        """Ids of jobs whose deadline has passed (queued or not; `expire_deadline` sorts them out)."""
        return [raw.decode() for raw in self.redis.zrangebyscore(self._deadlines, "-inf", time.time())]

    def reserve_idempotency_key(self, owner: str, key: str, fingerprint: str, ttl_s: int) -> str | None:
        """Claim `key` for a request with `fingerprint`; returns the job id of an earlier request with
        the same key and body (None: this request is the first and must create the job).

        Raises `InvalidInput` when the key was used with a different body, `Conflict` while the first
        request with the key is still being created.
        """
        name = self._idempotency(owner, key)
        if self.redis.set(name, json.dumps({"fingerprint": fingerprint, "job_id": ""}), nx=True, ex=ttl_s):
            return None
        deadline = time.monotonic() + 5.0
        while True:
            raw = self.redis.get(name)
            if raw is None:  # the first request failed and released the key: take it
                return self.reserve_idempotency_key(owner, key, fingerprint, ttl_s)
            held = json.loads(raw)
            if held["fingerprint"] != fingerprint:
                raise InvalidInput(
                    "This Idempotency-Key was already used with a different request body; "
                    "use a new key for a new request.",
                    code="idempotency_key_reused",
                )
            if held["job_id"]:
                return held["job_id"]
            if time.monotonic() > deadline:
                raise Conflict(
                    "A request with this Idempotency-Key is still being processed; retry shortly.",
                    code="idempotency_key_in_use",
                )
            time.sleep(0.05)

    def complete_idempotency_key(
        self, owner: str, key: str, fingerprint: str, job_id: str, ttl_s: int
    ) -> None:
        payload = json.dumps({"fingerprint": fingerprint, "job_id": job_id})
        self.redis.set(self._idempotency(owner, key), payload, ex=ttl_s)

    def release_idempotency_key(self, owner: str, key: str) -> None:
        self.redis.delete(self._idempotency(owner, key))

    # Webhook deliveries ------------------------------------------------------------------------------
    def create_delivery(
        self, delivery_id: str, *, job_id: str, owner: str, url: str, event: str, body: str, ttl_s: int
    ) -> None:
        summary = {"id": delivery_id, "event": event, "status": "pending", "attempts": 0}
        fields = {"job_id": job_id, "owner": owner, "url": url, "event": event, "body": body, "attempts": 0}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._delivery(delivery_id), mapping=fields)
        pipe.expire(self._delivery(delivery_id), ttl_s)
        pipe.execute()
        self._delivery_attempt(
            keys=[self._delivery(delivery_id), self._job(job_id)], args=[0, json.dumps(summary)]
        )

    def delivery(self, delivery_id: str) -> dict[str, str] | None:
        raw = self.redis.hgetall(self._delivery(delivery_id))
        return {k.decode(): v.decode() for k, v in raw.items()} if raw else None

    def record_delivery_attempt(self, delivery_id: str, job_id: str, summary: dict[str, Any]) -> None:
        keys = [self._delivery(delivery_id), self._job(job_id)]
        self._delivery_attempt(keys=keys, args=[summary["attempts"], json.dumps(summary)])

    # Worker side ----------------------------------------------------------------------------------
    def claim(self, job_id: str, *, worker: str, lease_ttl_s: float) -> Claim:
        """Take a queued job for this worker; any other state means the message is stale."""
        token = uuid.uuid4().hex
        keys = [self._job(job_id), self._lease(job_id), self._queue, self._running, self._events(job_id)]
        outcome, attempt = self._claim(
            keys=keys, args=[job_id, token, repr(time.time()), lease_ttl_s, worker]
        )
        return Claim(outcome=outcome.decode(), attempt=int(attempt), token=token)

    def renew_lease(self, job_id: str, token: str, lease_ttl_s: float) -> bool:
        return bool(self._renew(keys=[self._lease(job_id)], args=[token, lease_ttl_s]))

    def images(self, job_id: str) -> list[bytes]:
        raw = self.redis.hgetall(self._images(job_id))
        return [raw[k] for k in sorted(raw, key=int)]

    def progress(self, job_id: str, token: str, stage: str, step: int, total: int) -> None:
        data = json.dumps({"stage": stage, "step": step, "total": total})
        self._progress(keys=[self._job(job_id), self._events(job_id)], args=[token, data])

    def finish(
        self,
        job_id: str,
        token: str,
        status: JobStatus,
        *,
        ttl_s: int,
        metadata: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        result_bytes: bytes = b"",
    ) -> bool:
        """End this run's job; False (and nothing written) when another run owns the job now."""
        fields: dict[str, str] = {"finished_at": repr(time.time())}
        if metadata is not None:
            fields["metadata"] = json.dumps(metadata)
        if error is not None:
            fields["error"] = json.dumps(error)
        if result is not None:
            fields["result"] = json.dumps(result)
        keys = [
            self._job(job_id),
            self._lease(job_id),
            self._running,
            self._result(job_id),
            self._images(job_id),
            self._events(job_id),
        ]
        event = json.dumps(error or {})
        args: list[Any] = [token, status.value, ttl_s, event, result_bytes]
        for name, value in fields.items():
            args += [name, value]
        return bool(self._finish(keys=keys, args=args))

    def requeue_lost(self, max_attempts: int) -> list[tuple[str, int]]:
        """Requeue running jobs whose lease lapsed (their worker died); fail those out of attempts.

        Returns (job id, outcome) pairs: 1 requeued (the caller sends a new message), 2 failed.
        """
        outcomes = []
        for raw_id in self.redis.smembers(self._running):
            job_id = raw_id.decode()
            seq = self.redis.incr(f"{self.prefix}:seq")
            error = json.dumps(
                {
                    "code": "worker_lost",
                    "message": f"The worker running this job stopped responding {max_attempts} times; "
                    "the job was not retried again.",
                }
            )
            keys = [
                self._job(job_id),
                self._lease(job_id),
                self._queue,
                self._running,
                self._events(job_id),
                self._images(job_id),
            ]
            outcome = int(
                self._requeue(keys=keys, args=[job_id, seq, repr(time.time()), max_attempts, error])
            )
            if outcome:
                outcomes.append((job_id, outcome))
        return outcomes

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self._job(job_id), "cancel_requested") == b"1"

    def prune_queue(self) -> int:
        """Drop queue entries whose job expired while waiting (no worker took it within its TTL)."""
        stale = [
            job_id
            for job_id in self.redis.zrange(self._queue, 0, -1)
            if not self.redis.exists(self._job(job_id.decode()))
        ]
        return self.redis.zrem(self._queue, *stale) if stale else 0

    # Workers' liveness ----------------------------------------------------------------------------
    def announce_worker(self, name: str, info: dict[str, Any], ttl_s: float) -> None:
        self.redis.set(self._worker(name), json.dumps(info), px=int(ttl_s * 1000))

    def retire_worker(self, name: str) -> None:
        self.redis.delete(self._worker(name))

    def workers(self) -> Iterator[dict[str, Any]]:
        for key in self.redis.scan_iter(match=self._worker("*"), count=100):
            raw = self.redis.get(key)
            if raw:
                yield json.loads(raw)

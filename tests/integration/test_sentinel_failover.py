"""Redis Sentinel: the primary SIGKILLed under traffic. The sentinels fail over to the replica, and
every process (gateway, GPU workers, webhook worker) follows the new primary by itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

import httpx

from app.stack import LocalStack, ManagedProcess, SentinelRedis
from workers.store import Store

from .support import (
    FAST_LEASES,
    TERMINAL,
    WebhookReceiver,
    all_events,
    fail_with_logs,
    is_denoising,
    new_webhook_secret,
    sse_events,
    stack_env,
    submit_json,
    wait_for_job,
    wait_for_status,
    wait_until,
)

#: From the primary's SIGKILL to the service taking jobs again (a submission answered 202, which with
#: DREAMOMNI2_REDIS_MIN_REPLICAS=1 needs the restarted node back as the new primary's replica) and
#: to every job answered before finishing: the sentinels notice in 2 s (`down_after_ms`) and fail over
#: in about 1 more; a GPU worker's Celery consumer reconnects within a few seconds of that.
RECOVERY_BOUND_S = 30
#: Clients submitting all along, a job a second each (below what two workers run).
CLIENTS, PAUSE_S = 2, 1.0
#: Steps of the job running when the primary dies (seconds on the tiny models), and of the others.
LONG_STEPS, STEPS = 150, 2


class Traffic:
    """`CLIENTS` threads submitting jobs, each retrying its request (the same Idempotency-Key) until it
    is answered, so a retry never makes a second job. Answers other than the job or "retry" are kept
    in `unexpected` (a thread cannot fail the test)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answered: dict[str, tuple[str, float]] = {}  # Idempotency-Key -> (job id, when answered)
        self.refusals: dict[int, int] = {}  # status (0: no answer) -> count
        self.unexpected: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._submit, args=(n,), daemon=True) for n in range(CLIENTS)
        ]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # each client finishes the request it is retrying first
        for thread in self._threads:
            thread.join(timeout=60)

    def count(self) -> int:
        with self._lock:
            return len(self.answered)

    def first_answer_after(self, moment: float) -> float | None:
        with self._lock:
            return min((at for _, at in self.answered.values() if at > moment), default=None)

    def _submit(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            attempt = 0
            while not self._stop.is_set():
                key = f"c{n}-{attempt}"
                body = {"instruction": f"load {n}.{attempt}", "steps": STEPS, "translate": False}
                while not self._answered(key, self._send(client, key, body)):
                    time.sleep(0.2)
                if self.unexpected:
                    return
                attempt += 1
                time.sleep(PAUSE_S)

    @staticmethod
    def _send(client: httpx.Client, key: str, body: dict) -> httpx.Response | None:
        try:
            return submit_json(client, [], body, headers={"Idempotency-Key": key})
        except httpx.TransportError:
            return None

    def _answered(self, key: str, response: httpx.Response | None) -> bool:
        status = response.status_code if response is not None else 0
        with self._lock:
            if status in (200, 202):
                self.answered[key] = (response.json()["id"], time.monotonic())
                return True
            # 503: Redis is failing over, or the job could not reach a replica (nothing was stored);
            # 409: the key's reservation, left by a request cut off, is still held.
            if status not in (0, 409, 503):
                self.unexpected.append(f"{status} {response.text}")
                return True
            self.refusals[status] = self.refusals.get(status, 0) + 1
            return False


def test_the_primary_killed_mid_traffic_fails_over_and_every_job_answered_ends_once(
    tiny_cache: Path, tmp_path: Path
) -> None:
    secret = new_webhook_secret()
    with WebhookReceiver() as receiver, SentinelRedis(tmp_path / "redis") as redis_group:
        env = stack_env(
            tiny_cache,
            **FAST_LEASES,
            **redis_group.settings,
            DREAMOMNI2_REDIS_MIN_REPLICAS="1",
            DREAMOMNI2_RATE_LIMIT_PER_S="1000",
            DREAMOMNI2_RATE_LIMIT_BURST="1000",
            DREAMOMNI2_WEBHOOK_SECRET=secret,
            DREAMOMNI2_WEBHOOK_ALLOWLIST="127.0.0.1",
        )
        # Every process finds Redis through the sentinels; the stack's own port is only its readiness
        # check's, on the first primary.
        stack = LocalStack(tmp_path, workers=2, env=env, redis_port=redis_group.ports["redis-a"])
        try:
            for _ in range(stack.workers):
                stack.start_worker()
            stack.start_webhook_worker()
            stack.start_gateway()
            stack.wait_workers_ready()
            with httpx.Client(base_url=stack.url, timeout=30) as client:
                run_failover(stack, client, redis_group, receiver, secret)
        finally:
            stack.stop()


def run_failover(
    stack: LocalStack,
    client: httpx.Client,
    redis_group: SentinelRedis,
    receiver: WebhookReceiver,
    secret: str,
) -> None:
    services = list(stack.processes)  # the gateway and the workers; Redis is the group's
    with Traffic(stack.url) as traffic:
        wait_until(lambda: traffic.count() >= 4 or None, timeout=60, what="traffic", watch=services)
        body = {"instruction": "across the failover", "steps": LONG_STEPS, "translate": False}
        long_job = submit_json(client, [], body)
        assert long_job.status_code == 202, long_job.text
        long_id = long_job.json()["id"]
        wait_for_job(client, long_id, is_denoising, what="the long job to be denoising", watch=services)

        # The primary dies (a node lost, the OOM killer); the old primary's node comes back empty and,
        # as a restarted pod does, asks the sentinels for the primary and replicates it.
        redis_group.processes["redis-a"].kill()
        killed_at = time.monotonic()
        wait_until(
            lambda: redis_group.primary() == "redis-b" or None,
            timeout=RECOVERY_BOUND_S, what="the sentinels to fail over", interval=0.1,
        )  # fmt: skip
        failover_s = time.monotonic() - killed_at
        redis_group.start_node("redis-a", replica_of="redis-b")
        accepted_at = wait_until(
            lambda: traffic.first_answer_after(killed_at),
            timeout=RECOVERY_BOUND_S, what="a submission answered after the failover", watch=services,
        )  # fmt: skip
        wanted = traffic.count() + CLIENTS
        wait_until(lambda: traffic.count() >= wanted or None, timeout=RECOVERY_BOUND_S, what="more traffic")
    assert not traffic.unexpected, traffic.unexpected
    print(
        f"\nfailover {failover_s:.1f}s, first job accepted {accepted_at - killed_at:.1f}s after the kill; "
        f"{traffic.count()} jobs answered, refusals by status {traffic.refusals}"
    )
    assert accepted_at - killed_at < RECOVERY_BOUND_S

    store = Store.connect(redis_group.target.client())  # through the sentinels: the primary now
    ids = [job_id for job_id, _ in traffic.answered.values()] + [long_id]
    assert_each_ended_once(store, client, ids, services)
    # Nothing was stored that its client was not answered (a 503 stored nothing, or its retry got the
    # job that survived), and no key made two jobs.
    stored = {key.decode().split(":")[-1] for key in store.redis.scan_iter(match="do2:job:j_*")}
    stored = {job_id for job_id in stored if store.jobs.get(job_id) is not None}
    assert stored == set(ids), stored ^ set(ids)
    if dead := [p.name for p in services if not p.alive()]:
        fail_with_logs(f"{dead} exited across the failover", services)

    # The gateway's event streams (its asyncio client) and the webhook worker follow the new primary.
    with client.stream("GET", f"/v1/jobs/{long_id}/events") as stream:
        final = [event.event for event in sse_events(stream) if event.event in TERMINAL]
    assert final == ["succeeded"]
    hook = receiver.endpoint(secret)
    body = {"instruction": "after", "steps": 2, "webhook_url": hook}

    def accepted() -> httpx.Response | None:  # a 503 while the replica catches up is an answer too
        response = submit_json(client, [], body, headers={"Idempotency-Key": "hooked"})
        return response if response.status_code in (200, 202) else None

    hooked = wait_until(accepted, timeout=RECOVERY_BOUND_S, what="the hooked job", interval=0.5)
    delivered = receiver.wait_for(hook, lambda got: bool(got), timeout=RECOVERY_BOUND_S, watch=services)
    assert delivered[-1].payload["id"] == hooked.json()["id"]


def assert_each_ended_once(
    store: Store, client: httpx.Client, ids: Iterable[str], services: list[ManagedProcess]
) -> None:
    """Each job succeeds within the bound with one final event, and its runs came one after another:
    a later run only after the store took the job back from the earlier (a requeue event between)."""
    for job_id in ids:
        done = wait_for_status(client, job_id, timeout=RECOVERY_BOUND_S + 30, watch=services)
        assert done["status"] == "succeeded", done
        events = all_events(store.jobs, job_id)
        types = [event.type for event in events]
        assert [t for t in types if t in TERMINAL] == ["succeeded"] and types[-1] == "succeeded", types
        runs = [n for n, event in enumerate(events) if event.type == "started"]
        assert [events[n].data["attempt"] for n in runs] == list(range(1, len(runs) + 1)), types
        for before, after in zip(runs, runs[1:], strict=False):
            assert "queued" in types[before:after], f"{job_id}: a run began before the last one ended"

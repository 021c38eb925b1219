"""Faults on the real processes: Redis killed and restarted from its append-only file mid-traffic, with
webhook deliveries in flight; Celery consumers that stop for good."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.stack import LocalStack
from workers.store import Store

from .support import (
    TERMINAL,
    WebhookReceiver,
    all_events,
    new_webhook_secret,
    stack_env,
    submit_json,
    wait_for_job,
    wait_for_status,
    wait_until,
)

#: Seconds Redis stays down: longer than a lease (3 s), so every lease lapses meanwhile.
OUTAGE_S = 5


def outage_env(tiny_cache: Path, secret: str, **extra: str) -> dict[str, str]:
    """A stack for a Redis outage: leases that lapse during it, fast heartbeats and reaper passes,
    webhooks signed with `secret` to loopback receivers."""
    return stack_env(
        tiny_cache,
        DREAMOMNI2_LEASE_TTL_S="3",
        DREAMOMNI2_HEARTBEAT_S="1",
        DREAMOMNI2_REAPER_INTERVAL_S="1",
        DREAMOMNI2_WEBHOOK_SECRET=secret,
        DREAMOMNI2_WEBHOOK_ALLOWLIST="127.0.0.1",
        **extra,
    )


def test_redis_killed_and_restarted_mid_traffic_loses_nothing(tiny_cache: Path, tmp_path: Path) -> None:
    secret = new_webhook_secret()
    # The hooked job's retry falls due as Redis comes back (it dies ~2 s after the first attempt).
    env = outage_env(tiny_cache, secret, DREAMOMNI2_WEBHOOK_BACKOFF_S="8")
    with (
        WebhookReceiver() as receiver,
        LocalStack(tmp_path, workers=1, env=env, persist_redis=True) as stack,
        httpx.Client(base_url=stack.url, timeout=30) as client,
    ):
        # A delivery whose retry waits in Redis when Redis dies.
        hook = receiver.endpoint(secret, answers=[500])
        first = submit_json(client, [], {"instruction": "a hooked one", "steps": 2, "webhook_url": hook})
        [attempt] = receiver.wait_for(hook, lambda got: len(got) >= 1, what="the first webhook attempt")
        # A job running and two queued behind it.
        running = submit_json(client, [], {"instruction": "a long one", "steps": 1500}).json()["id"]
        wait_for_job(client, running, lambda job: job["status"] == "running", what="the long job to run")
        queued = [
            submit_json(client, [], {"instruction": f"queued {n}", "steps": 2}).json()["id"] for n in (1, 2)
        ]
        time.sleep(1.5)  # the append-only file is written every second
        waiting = Store.from_url(stack.redis_url).deliveries.retry_due(attempt.webhook_id)
        assert waiting is not None and waiting > time.time(), "the retry was sent before the outage"

        redis_process = next(p for p in stack.processes if p.name == "redis")
        redis_process.kill()
        started = time.monotonic()
        while time.monotonic() - started < OUTAGE_S:
            answer = client.get(f"/v1/jobs/{running}")
            assert answer.status_code == 503 and answer.headers["retry-after"] == "2", answer.text
            refused = submit_json(client, [], {"instruction": "during the outage", "steps": 2})
            assert refused.status_code == 503 and "retry-after" in refused.headers
            time.sleep(0.5)
        assert time.monotonic() - started < OUTAGE_S + 5, "the gateway hung while Redis was down"
        stack.start_redis()
        back = time.monotonic()

        workers = [p for p in stack.processes if p.name != "redis"]
        for job_id in (running, *queued):
            done = wait_for_status(client, job_id, timeout=120, watch=workers)
            assert done["status"] == "succeeded", done
        # The outage cost the running job nothing: one run, one final event.
        assert client.get(f"/v1/jobs/{running}").json()["attempts"] == 1
        store = Store.from_url(stack.redis_url)
        events = all_events(store.jobs, running)
        assert [e.type for e in events if e.type in TERMINAL] == ["succeeded"]
        # Every process is still running (the webhook worker used to exit, status 0, on this), and the
        # webhook worker took up its queue again: the retry that waited through the outage is sent,
        # under the same webhook-id, and so is a new delivery.
        dead = [p.name for p in stack.processes if p is not redis_process and not p.alive()]
        assert not dead, dead
        assert first.status_code == 202
        retried = receiver.wait_for(hook, lambda got: any(r.answered == 204 for r in got), timeout=30)
        assert [r.answered for r in retried] == [500, 204] and retried[1].at > back
        assert retried[1].webhook_id == attempt.webhook_id
        after = receiver.endpoint(secret)
        later = submit_json(client, [], {"instruction": "after", "steps": 2, "webhook_url": after}).json()
        delivered = receiver.wait_for(after, lambda got: any(r.answered == 204 for r in got), timeout=60)
        assert json.loads(delivered[-1].body)["id"] == later["id"]


def test_a_burst_of_held_submissions_larger_than_the_thread_pool(tiny_cache: Path, tmp_path: Path) -> None:
    # 140 `Prefer: wait` submissions at once on a gateway with 128 threads and no worker: each is held
    # its full wait, so some wait for a thread. None may fail for want of a Redis connection (or
    # answer 503 after making its job), and readiness stays 200 meanwhile.
    burst = 140
    env = stack_env(
        tiny_cache,
        DREAMOMNI2_MAX_WAIT_S="3",
        DREAMOMNI2_RATE_LIMIT_BURST=str(2 * burst),
        DREAMOMNI2_THREADS="128",
    )
    with LocalStack(tmp_path, workers=0, env=env) as stack:
        readiness: list[int] = []
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=stack.url, timeout=30) as prober:
                while not stop.is_set():
                    readiness.append(prober.get("/readyz").status_code)
                    time.sleep(0.2)

        def submit(n: int) -> int:
            with httpx.Client(base_url=stack.url, timeout=60) as one:
                body = {"instruction": f"burst {n}", "steps": 1}
                return submit_json(one, [], body, headers={"Prefer": "wait=30"}).status_code

        prober = threading.Thread(target=probe)
        prober.start()
        with ThreadPoolExecutor(max_workers=burst) as pool:
            statuses = list(pool.map(submit, range(burst)))
        stop.set()
        prober.join()
        assert statuses == [202] * burst, sorted(set(statuses))
        assert readiness and set(readiness) == {200}
        assert Store.from_url(stack.redis_url).jobs.queue_depth() == burst  # one job per request
        assert "Too many connections" not in stack.processes[-1].log_tail(2000)


def test_a_flood_of_jobs_none_lost_none_twice_counters_agree_keys_expire(
    tiny_cache: Path, tmp_path: Path
) -> None:
    flood, ttl_s = 200, 600
    env = stack_env(tiny_cache, DREAMOMNI2_JOB_TTL_S=str(ttl_s), DREAMOMNI2_RATE_LIMIT_BURST=str(2 * flood))
    with (
        LocalStack(tmp_path, workers=1, env=env) as stack,
        httpx.Client(base_url=stack.url, timeout=60) as client,
    ):

        def submit(n: int) -> str:
            body = {"instruction": f"flood {n}", "steps": 1, "translate": False}
            response = submit_json(client, [], body)
            assert response.status_code == 202, response.text
            return response.json()["id"]

        with ThreadPoolExecutor(max_workers=8) as pool:
            ids = list(pool.map(submit, range(flood)))
        assert len(set(ids)) == flood
        store = Store.from_url(stack.redis_url)
        wait_until(
            lambda: store.jobs.queue_depth() == 0 and not store.redis.scard("do2:running") or None,
            timeout=240, what="the flood to drain", watch=stack.processes,
        )  # fmt: skip
        finals = {
            job_id: [e.type for e in all_events(store.jobs, job_id) if e.type in TERMINAL] for job_id in ids
        }
        assert all(types == ["succeeded"] for types in finals.values()), finals
        samples = {
            s.labels.get("adapter"): s.value
            for family in text_string_to_metric_families(client.get("/metrics").text)
            for s in family.samples
            if s.name == "dreamomni2_jobs_submitted_total"
        }
        assert sum(samples.values()) == flood
        # Everything the flood left in Redis goes by itself: every key but the few shared structures
        # (the queue, the running set, the sequence, ...) carries an expiry within the job TTL.
        shared = {"do2:queue", "do2:running", "do2:seq", "do2:deadlines"}
        lasting = {
            key.decode(): store.redis.ttl(key)
            for key in store.redis.scan_iter(match="do2:*", count=1000)
            if key.decode() not in shared
        }
        assert lasting and all(0 < ttl <= ttl_s for ttl in lasting.values()), {
            k: v for k, v in lasting.items() if not 0 < v <= ttl_s
        }


def test_the_gateway_killed_again_and_again_under_load_leaves_no_dead_job(
    tiny_cache: Path, tmp_path: Path
) -> None:
    # Clients keep submitting, each with its own Idempotency-Key and retrying with that key until it
    # gets an answer, while the gateway is SIGKILLed and restarted again and again. Afterwards every
    # key names exactly one job, every stored job runs to its end (none sits queued with no message
    # to run it), and every replay hands back that job.
    kills, clients = 4, 6
    env = stack_env(
        tiny_cache,
        DREAMOMNI2_LEASE_TTL_S="3",
        DREAMOMNI2_HEARTBEAT_S="1",
        DREAMOMNI2_REAPER_INTERVAL_S="1",
    )
    with LocalStack(tmp_path, workers=1, env=env) as stack:
        answered: dict[str, str] = {}
        stop = threading.Event()

        def load(n: int) -> None:
            with httpx.Client(base_url=stack.url, timeout=10) as one:
                for attempt in range(10_000):
                    if stop.is_set():
                        return
                    key = f"kill-{n}-{attempt}"
                    body = {"instruction": f"load {n}.{attempt}", "steps": 1, "translate": False}
                    while True:
                        try:
                            response = submit_json(one, [], body, headers={"Idempotency-Key": key})
                        except httpx.TransportError:
                            response = None  # the gateway died under this request: retry it
                        if response is not None and response.status_code in (200, 202):
                            answered[key] = response.json()["id"]
                            break
                        # 503: the gateway is starting; 409: the key's reservation, left by a gateway
                        # killed before it stored the job, has not lapsed yet.
                        assert response is None or response.status_code in (409, 503), response.text
                        time.sleep(0.2)

        threads = [threading.Thread(target=load, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(kills):
                before = len(answered)
                wait_until(lambda b=before: len(answered) >= b + 5 or None, timeout=60, what="some load")
                gateway = next(p for p in reversed(stack.processes) if p.name == "gateway")
                gateway.kill()
                stack.processes.remove(gateway)
                stack.start_gateway()
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        store = Store.from_url(stack.redis_url)
        workers = [p for p in stack.processes if p.name.startswith("worker")]
        wait_until(
            lambda: store.jobs.queue_depth() == 0 and not store.redis.scard("do2:running") or None,
            timeout=180, what="every stored job to run", watch=workers,
        )  # fmt: skip
        stored = {key.decode().split(":")[-1] for key in store.redis.scan_iter(match="do2:job:j_*")}
        stored = {job_id for job_id in stored if store.jobs.get(job_id) is not None}
        # A request cut off before its job was stored made none; one that stored it, kept it: every
        # stored job belongs to exactly one key, and every key that was answered to one job.
        assert set(answered.values()) <= stored
        assert len(set(answered.values())) == len(answered)
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            for job_id in stored:
                job = client.get(f"/v1/jobs/{job_id}").json()
                assert job["status"] == "succeeded", job
            for key, job_id in answered.items():
                n, attempt = key.split("-")[1:]
                body = {"instruction": f"load {n}.{attempt}", "steps": 1, "translate": False}
                replay = submit_json(client, [], body, headers={"Idempotency-Key": key})
                assert replay.headers.get("idempotent-replayed") == "true", replay.text
                assert replay.json()["id"] == job_id and replay.json()["status"] == "succeeded"


#: Longer than Celery's first reconnection tries.
CONSUMER_OUTAGE_S = 6
#: How soon after Redis returns an idle worker must take a new job (generous, for a busy machine).
RESUME_S = 15


def probe(stack: LocalStack, name: str) -> subprocess.CompletedProcess:
    """`python -m workers.health` for process `name`, as its liveness probe runs it."""
    env = stack.process_env({"DREAMOMNI2_LIVENESS_FILE": str(stack.workdir / f"{name}.alive")})
    return subprocess.run(
        [sys.executable, "-m", "workers.health"], env=env, capture_output=True, text=True, timeout=60
    )


def test_redis_killed_with_webhooks_in_flight_every_consumer_comes_back(
    tiny_cache: Path, tmp_path: Path
) -> None:
    secret = new_webhook_secret()
    env = outage_env(tiny_cache, secret)
    with (
        WebhookReceiver() as receiver,
        LocalStack(tmp_path, workers=2, env=env, persist_redis=True) as stack,
        httpx.Client(base_url=stack.url, timeout=30) as client,
    ):
        # Deliveries in flight (the endpoint answers 4 s after each arrives), a job running on one
        # worker, the other idle.
        slow = receiver.endpoint(secret, hold_s=4)
        for n in range(3):
            submit_json(client, [], {"instruction": f"hooked {n}", "steps": 2, "webhook_url": slow})
        receiver.wait_for(slow, lambda got: len(got) >= 3, what="three deliveries in flight")
        running = submit_json(client, [], {"instruction": "a long one", "steps": 1500}).json()["id"]
        wait_for_job(client, running, lambda job: job["status"] == "running", what="the long job to run")
        time.sleep(1.2)  # the append-only file is written every second

        redis_process = next(p for p in stack.processes if p.name == "redis")
        redis_process.kill()
        down = time.monotonic()
        while time.monotonic() - down < CONSUMER_OUTAGE_S:
            answer = client.get("/readyz")
            assert answer.status_code == 503 and answer.headers.get("retry-after") == "2", answer.headers
            time.sleep(0.5)
        stack.start_redis()
        back = time.time()

        # An idle worker takes a new job within RESUME_S of Redis's return, and the job's webhook
        # follows its end within 10 s.
        fast = receiver.endpoint(secret)
        new = submit_json(client, [], {"instruction": "after", "steps": 2, "webhook_url": fast}).json()["id"]
        workers = [p for p in stack.processes if p.name != "redis"]
        done = wait_for_status(client, new, timeout=60, watch=workers)
        ended = time.monotonic()
        assert done["status"] == "succeeded", done
        started = datetime.fromisoformat(done["started_at"]).timestamp()
        assert started - back < RESUME_S, f"an idle worker took {started - back:.1f}s to take a job"
        delivered = receiver.wait_for(fast, lambda got: any(r.answered == 204 for r in got), timeout=30)
        assert delivered[-1].at - ended < 10

        # No process alive but idle: every one runs, its liveness probe passes, both GPU workers count
        # as ready (consuming) again.
        dead = [p.name for p in stack.processes if p is not redis_process and not p.alive()]
        assert not dead, dead
        for name in ("worker-1", "worker-2", "webhooks"):
            result = probe(stack, name)
            assert result.returncode == 0, (name, result.stdout, result.stderr)
        wait_until(
            lambda: client.get("/readyz").json()["workers"]["ready"] == 2,
            timeout=15,
            what="both workers ready",
        )


#: Run a webhook worker whose consumer fails as it starts (an error Celery cannot recover from).
BROKEN_CONSUMER = """
import sys
import workers.consuming

def start(self, consumer):
    raise RuntimeError("injected: the consumer cannot start")

workers.consuming.Consuming.start = start
from workers.webhooks import main
sys.exit(main())
"""


def test_a_worker_whose_consumer_stops_for_good_exits_non_zero(
    main_stack: LocalStack, tmp_path: Path
) -> None:
    env = main_stack.process_env(
        {
            "DREAMOMNI2_WEBHOOK_QUEUE": f"broken-{tmp_path.name}",
            "DREAMOMNI2_LIVENESS_FILE": str(tmp_path / "alive"),
        }
    )
    result = subprocess.run(
        [sys.executable, "-c", BROKEN_CONSUMER], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Unrecoverable error" in result.stderr and "stopped for good" in result.stderr

"""Workers that die or fail: a SIGKILLed worker's job runs again exactly once (or fails when out of
attempts), and a job that fails inside a worker leaves that worker serving."""

from __future__ import annotations

import contextlib
import io
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import redis
from PIL import Image

from app.stack import LocalStack, ManagedProcess
from workers.store import JobStore, Store

from .support import (
    FAST_LEASES,
    LONG_STEPS,
    MAX_STEPS,
    TERMINAL,
    all_events,
    assert_error,
    get_job,
    is_denoising,
    stack_env,
    submit_json,
    wait_for_job,
    wait_for_status,
    wait_until,
)

#: The promised bound from a worker's death to its job starting again (or failing) elsewhere.
RECOVERY_BOUND_S = 60
#: Steps of the job to kill: seconds to run, and few enough that both runs' progress events fit in
#: the job's event stream (capped near 1000 entries) next to its queued, started and final events.
KILL_STEPS = 800


@contextlib.contextmanager
def fast_lease_stack(
    tiny_cache: Path, tmp_path: Path, workers: int, **env: str
) -> Iterator[tuple[LocalStack, httpx.Client]]:
    """A stack of its own with short leases (`FAST_LEASES`, then `env`), and a client of its gateway."""
    with (
        LocalStack(tmp_path, workers=workers, env=stack_env(tiny_cache, **FAST_LEASES, **env)) as stack,
        httpx.Client(base_url=stack.url, timeout=30) as client,
    ):
        yield stack, client


def timestamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def kill_mid_job(
    stack: LocalStack, store: JobStore, client: httpx.Client, job_id: str
) -> tuple[ManagedProcess, float]:
    """SIGKILL the worker running `job_id` once it is denoising; returns it and the time of the kill."""
    wait_for_job(
        client, job_id, is_denoising, timeout=60, what="the job to be denoising", watch=stack.processes
    )
    running_on = store.get(job_id).worker
    victim = next(p for p in stack.processes if p.name == running_on)
    killed_at = time.time()
    victim.kill()
    assert not victim.alive()
    job = store.get(job_id)
    assert job.status.value == "running" and job.progress.step < job.progress.total, job
    return victim, killed_at


def test_killed_worker_job_runs_again_exactly_once(tiny_cache: Path, tmp_path: Path) -> None:
    with fast_lease_stack(tiny_cache, tmp_path, 2) as (stack, client):
        store = Store.from_url(stack.redis_url).jobs
        response = submit_json(client, [], {"instruction": "A long night", "steps": KILL_STEPS, "seed": 11})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        victim, killed_at = kill_mid_job(stack, store, client, job_id)
        survivors = [p for p in stack.processes if p is not victim]
        done = wait_for_status(client, job_id, timeout=RECOVERY_BOUND_S + 60, watch=survivors)

        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        survivor = store.get(job_id).worker
        assert survivor != victim.name and survivor.startswith("worker-")
        recovery_s = timestamp(done["started_at"]) - killed_at
        print(
            f"\njob {job_id} started again on {survivor} {recovery_s:.2f}s after {victim.name} was SIGKILLed"
        )
        assert 0 < recovery_s < RECOVERY_BOUND_S

        events = all_events(store, job_id)
        assert events[0].type == "queued", "the stream lost its first events"
        types = [event.type for event in events]
        assert [t for t in types if t in TERMINAL] == ["succeeded"] and types[-1] == "succeeded"
        assert [event.data.get("attempt") for event in events if event.type == "started"] == [1, 2]
        requeued = [event.data.get("reason") for event in events if event.type == "queued" and event.data]
        assert requeued == ["worker_lost"]
        assert not store.redis.sismember("do2:running", job_id)
        assert not store.redis.exists(f"do2:lease:{job_id}")

        result = client.get(done["links"]["result"])
        assert result.status_code == 200
        assert Image.open(io.BytesIO(result.content)).size == (
            done["result"]["width"],
            done["result"]["height"],
        )


def test_a_requeued_job_runs_before_jobs_submitted_after_it(tiny_cache: Path, tmp_path: Path) -> None:
    # A job whose worker died already waited its turn: it goes first, not behind everything since.
    with fast_lease_stack(tiny_cache, tmp_path, 2) as (stack, client):
        store = Store.from_url(stack.redis_url).jobs
        lost, busy = (
            submit_json(client, [], {"instruction": name, "steps": MAX_STEPS}).json()["id"]
            for name in ("a lost run", "a long run")
        )
        for job_id in (lost, busy):
            wait_for_job(client, job_id, is_denoising, timeout=60, what="both to run", watch=stack.processes)
        later = [submit_json(client, [], {"instruction": "later", "steps": 2}).json()["id"] for _ in range(2)]

        victim, _ = kill_mid_job(stack, store, client, lost)
        survivor = next(p for p in stack.processes if p.name.startswith("worker") and p is not victim)
        requeued = wait_for_job(
            client, lost, lambda job: job["status"] == "queued", timeout=RECOVERY_BOUND_S, watch=[survivor]
        )
        assert requeued["queue_position"] == 1, requeued
        assert [get_job(client, job_id)["queue_position"] for job_id in later] == [2, 3]
        # Free the one live worker: it takes the requeued job before the two submitted after it.
        assert client.post(f"/v1/jobs/{busy}/cancel").status_code == 202
        wait_for_job(client, lost, is_denoising, timeout=60, what="the requeued job to run", watch=[survivor])
        assert [get_job(client, job_id)["status"] for job_id in later] == ["queued", "queued"]
        assert client.post(f"/v1/jobs/{lost}/cancel").status_code == 202
        started = [timestamp(wait_for_status(client, job_id, timeout=60)["started_at"]) for job_id in later]
        assert started == sorted(started), "the later jobs ran out of order"


def test_killed_worker_job_fails_when_out_of_attempts(tiny_cache: Path, tmp_path: Path) -> None:
    with fast_lease_stack(tiny_cache, tmp_path, 2, DREAMOMNI2_MAX_ATTEMPTS="1") as (stack, client):
        store = Store.from_url(stack.redis_url).jobs
        response = submit_json(client, [], {"instruction": "A long night", "steps": KILL_STEPS})
        job_id = response.json()["id"]

        victim, killed_at = kill_mid_job(stack, store, client, job_id)
        survivors = [p for p in stack.processes if p is not victim]
        done = wait_for_status(client, job_id, timeout=RECOVERY_BOUND_S + 30, watch=survivors)

        assert done["status"] == "failed"
        assert done["error"]["code"] == "worker_lost"
        assert done["attempts"] == 1 and done["result"] is None
        assert 0 < timestamp(done["finished_at"]) - killed_at < RECOVERY_BOUND_S
        types = [event.type for event in all_events(store, job_id)]
        assert [t for t in types if t in TERMINAL] == ["failed"] and types.count("started") == 1
        assert_error(client.get(done["links"]["result"]), 409, "job_failed")
        assert not store.redis.exists(f"do2:job:{job_id}:images")

        # The other worker was never disturbed: it takes the next job.
        after = submit_json(
            client, [], {"instruction": "A short one", "steps": 2}, headers={"Prefer": "wait=30"}
        )
        assert after.json()["status"] == "succeeded"
        assert store.get(after.json()["id"]).worker != victim.name


def test_failed_job_leaves_the_worker_serving(tiny_cache: Path, tmp_path: Path) -> None:
    with (
        LocalStack(
            tmp_path, workers=1, env=stack_env(tiny_cache), worker_env={"DREAMOMNI2_JOB_TIMEOUT_S": "2"}
        ) as stack,
        httpx.Client(base_url=stack.url, timeout=30) as client,
    ):
        store = Store.from_url(stack.redis_url).jobs
        worker = next(p for p in stack.processes if p.name.startswith("worker"))
        pid = worker.pid
        response = submit_json(client, [], {"instruction": "Too long", "steps": LONG_STEPS})
        job_id = response.json()["id"]

        failed = wait_for_status(client, job_id, timeout=60, watch=stack.processes)

        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "timeout"
        assert failed["error"]["details"] == {"limit_s": 2}
        assert failed["progress"]["stage"] == "denoise"
        assert 0 < failed["progress"]["step"] < LONG_STEPS
        assert_error(client.get(failed["links"]["result"]), 409, "job_failed")

        response = submit_json(
            client, [], {"instruction": "A short one", "steps": 2}, headers={"Prefer": "wait=30"}
        )
        after = response.json()

        assert after["status"] == "succeeded", after["error"]
        assert worker.alive() and worker.pid == pid
        assert store.get(after["id"]).worker == store.get(job_id).worker == worker.name
        assert client.get("/readyz").json()["workers"] == {
            "up": 1,
            "ready": 1,
            "memory_modes": {"resident": 1},
            "speed_fallbacks": {},
        }


def blocked_pops(broker: redis.Redis) -> int:
    """How many clients wait in a blocking pop (a Celery worker idle on its queues)."""
    return sum(1 for client in broker.client_list() if client["cmd"] == "brpop" and "b" in client["flags"])


def test_a_queued_job_whose_message_is_lost_still_runs(tiny_cache: Path, tmp_path: Path) -> None:
    # The job store is the truth: a queued job with no message in the broker gets a new one.
    with fast_lease_stack(tiny_cache, tmp_path, 1) as (stack, client):
        store = Store.from_url(stack.redis_url)
        broker = store.redis
        first = next(p for p in stack.processes if p.name.startswith("worker"))

        # (a) Never sent: as a gateway killed between storing the job and sending its message leaves it.
        first.stop()
        never_sent = submit_json(client, [], {"instruction": "a lost one", "steps": 2}).json()["id"]
        assert broker.llen("dreamomni2.jobs") == 1
        broker.delete("dreamomni2.jobs")

        # (b) Taken and lost: a frozen idle worker's pending BRPOP takes the message; then it dies.
        waiting_before = blocked_pops(broker)  # the webhook worker's
        second = stack.start_worker()
        stack.wait_workers_ready(1)
        # Frozen once its BRPOP waits in Redis: the pending pop still takes the next message.
        wait_until(lambda: blocked_pops(broker) > waiting_before, timeout=30, what="the worker's BRPOP")
        second.popen.send_signal(signal.SIGSTOP)
        taken = submit_json(client, [], {"instruction": "a taken one", "steps": 2}).json()["id"]
        wait_until(lambda: broker.llen("dreamomni2.jobs") == 0, timeout=30, what="the frozen pop to take it")
        second.kill()
        assert store.jobs.get(never_sent).status.value == "queued"
        assert store.jobs.get(taken).status.value == "queued"

        third = stack.start_worker()
        for job_id in (never_sent, taken):
            done = wait_for_status(client, job_id, timeout=90, watch=[third])
            assert done["status"] == "succeeded" and done["attempts"] == 1, done
        assert "was queued without a queue message; sent it again" in third.log.read_text()
        assert store.jobs.queue_depth() == 0


def test_a_worker_frozen_past_its_lease_writes_nothing_when_it_resumes(
    tiny_cache: Path, tmp_path: Path
) -> None:
    with fast_lease_stack(tiny_cache, tmp_path, 2) as (stack, client):
        store = Store.from_url(stack.redis_url).jobs
        job_id = submit_json(client, [], {"instruction": "A long night", "steps": KILL_STEPS}).json()["id"]
        wait_for_job(client, job_id, is_denoising, timeout=60, what="the job to be denoising")
        frozen = next(p for p in stack.processes if p.name == store.get(job_id).worker)
        other = next(p for p in stack.processes if p.name.startswith("worker") and p is not frozen)
        frozen.popen.send_signal(signal.SIGSTOP)
        try:
            wait_until(
                lambda: store.get(job_id).attempts == 2 or None,
                timeout=60,
                what="the second run",
                watch=[other],
            )
        finally:
            frozen.popen.send_signal(signal.SIGCONT)
        done = wait_for_status(client, job_id, timeout=RECOVERY_BOUND_S + 60, watch=[other, frozen])

        assert done["status"] == "succeeded" and done["attempts"] == 2, done
        assert store.get(job_id).worker == other.name
        types = [event.type for event in all_events(store, job_id)]
        assert [t for t in types if t in TERMINAL] == ["succeeded"]
        wait_until(
            lambda: "run abandoned after losing its lease" in frozen.log.read_text() or None,
            timeout=30, what="the resumed run to give up", watch=[frozen],
        )  # fmt: skip
        assert frozen.alive()

"""The job store's state machine against a real Redis: claims, run tokens, leases, requeues."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from api_schemas.api import JobStatus
from api_schemas.errors import NotFound
from workers.store import JobStore

SPEC = {"params": {"instruction": "x"}, "task": "generate", "adapter": "base", "image_count": 0}


@pytest.fixture
def store(redis_url) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), prefix=f"t{uuid.uuid4().hex[:8]}")


def new_job(store: JobStore, images: list[bytes] | None = None, owner: str = "alice"):
    return store.create(owner=owner, spec=SPEC, images=images or [], ttl_s=60)


def test_create_queues_with_positions_and_inputs(store):
    first, second = new_job(store, [b"one", b"two"]), new_job(store)
    assert first.status is JobStatus.QUEUED and first.owner == "alice"
    assert store.queue_position(first.id) == 1 and store.queue_position(second.id) == 2
    assert store.images(first.id) == [b"one", b"two"]
    assert [e.type for e in store.events(first.id)] == ["queued"]
    assert 0 < store.redis.ttl(store._job(first.id)) <= 60


def test_other_owners_and_unknown_ids_are_not_found(store):
    job = new_job(store)
    with pytest.raises(NotFound):
        store.get(job.id, owner="bob")
    with pytest.raises(NotFound):
        store.get("j_does_not_exist")
    with pytest.raises(NotFound):
        store.get("../etc/passwd")


def test_claim_is_exclusive_and_a_second_delivery_is_skipped(store):
    job = new_job(store)
    first = store.claim(job.id, worker="w1", lease_ttl_s=5)
    second = store.claim(job.id, worker="w2", lease_ttl_s=5)
    assert first.claimed and first.attempt == 1
    assert not second.claimed and second.outcome == "running"
    record = store.get(job.id)
    assert record.status is JobStatus.RUNNING and record.worker == "w1" and record.attempts == 1
    assert store.queue_position(job.id) is None
    assert store.claim("j_missing", worker="w1", lease_ttl_s=5).outcome == "missing"


def test_finish_writes_once_and_only_for_the_owning_run(store):
    job = new_job(store, [b"img"])
    claim = store.claim(job.id, worker="w1", lease_ttl_s=5)
    assert not store.finish(job.id, "not-the-token", JobStatus.SUCCEEDED, ttl_s=60)
    assert store.finish(
        job.id,
        claim.token,
        JobStatus.SUCCEEDED,
        ttl_s=60,
        result={"content_type": "image/png"},
        result_bytes=b"PNG",
    )
    assert not store.finish(job.id, claim.token, JobStatus.FAILED, ttl_s=60, error={"code": "x"})
    record = store.get(job.id)
    assert record.status is JobStatus.SUCCEEDED and record.error is None
    assert store.result(job.id) == b"PNG"
    assert store.images(job.id) == []  # inputs are dropped once the job ends
    assert [e.type for e in store.events(job.id)] == ["queued", "started", "succeeded"]


def test_progress_from_a_stale_run_is_ignored(store):
    job = new_job(store)
    claim = store.claim(job.id, worker="w1", lease_ttl_s=5)
    store.progress(job.id, claim.token, "denoise", 3, 30)
    store.progress(job.id, "stale", "denoise", 29, 30)
    assert store.get(job.id).progress == {"stage": "denoise", "step": 3, "total": 30}


def test_a_lapsed_lease_is_requeued_and_the_old_run_cannot_write(store):
    job = new_job(store)
    old = store.claim(job.id, worker="w1", lease_ttl_s=0.2)
    assert store.requeue_lost(max_attempts=3) == []  # lease still alive
    time.sleep(0.3)
    assert store.requeue_lost(max_attempts=3) == [(job.id, 1)]
    assert store.get(job.id).status is JobStatus.QUEUED and store.queue_position(job.id) == 1
    new = store.claim(job.id, worker="w2", lease_ttl_s=5)
    assert new.claimed and new.attempt == 2
    assert not store.finish(job.id, old.token, JobStatus.SUCCEEDED, ttl_s=60, result_bytes=b"old")
    assert store.finish(job.id, new.token, JobStatus.SUCCEEDED, ttl_s=60, result_bytes=b"new")
    assert store.result(job.id) == b"new"


def test_renewing_keeps_the_lease(store):
    job = new_job(store)
    claim = store.claim(job.id, worker="w1", lease_ttl_s=0.3)
    for _ in range(4):
        time.sleep(0.15)
        assert store.renew_lease(job.id, claim.token, 0.3)
    assert store.requeue_lost(max_attempts=3) == []
    assert not store.renew_lease(job.id, "other", 0.3)


def test_out_of_attempts_fails_with_worker_lost(store):
    job = new_job(store, [b"img"])
    store.claim(job.id, worker="w1", lease_ttl_s=0.1)
    time.sleep(0.2)
    assert store.requeue_lost(max_attempts=1) == [(job.id, 2)]
    record = store.get(job.id)
    assert record.status is JobStatus.FAILED and record.error["code"] == "worker_lost"
    assert store.images(job.id) == []
    assert store.events(job.id)[-1].type == "failed"


def test_wait_until_terminal_wakes_on_the_final_event(store):
    job = new_job(store)
    claim = store.claim(job.id, worker="w1", lease_ttl_s=5)
    assert store.wait_until_terminal(job.id, 0.2).status is JobStatus.RUNNING
    import threading

    threading.Timer(0.2, lambda: store.finish(job.id, claim.token, JobStatus.SUCCEEDED, ttl_s=60)).start()
    started = time.monotonic()
    assert store.wait_until_terminal(job.id, 10).status is JobStatus.SUCCEEDED
    assert time.monotonic() - started < 5


def test_prune_drops_queue_entries_of_expired_jobs(store):
    job = new_job(store)
    store.redis.delete(store._job(job.id))
    assert store.prune_queue() == 1
    assert store.queue_depth() == 0


def test_worker_registry(store):
    store.announce_worker("w1", {"name": "w1", "ready": True}, ttl_s=5)
    store.announce_worker("w2", {"name": "w2", "ready": False}, ttl_s=5)
    assert sorted(w["name"] for w in store.workers()) == ["w1", "w2"]
    store.retire_worker("w1")
    assert [w["name"] for w in store.workers()] == ["w2"]

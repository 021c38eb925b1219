"""The job store's state machine against a real Redis: claims, run tokens, leases, requeues."""

from __future__ import annotations

import json
import threading
import time
import uuid
from importlib import resources

import pytest
import redis

from api_schemas.api import ErrorInfo, JobStatus, OutputFormat, Progress, ProgressEvent
from api_schemas.common import Task
from api_schemas.jobs import JobLimits, JobParameters, resolve_job
from api_schemas.records import JobRecord, JobSpec, StoredResult
from workers.store import ClaimOutcome, DiscardOutcome, JobStore, RequeueOutcome, Reservation, Store
from workers.store.quotas import Limits

SPEC = JobSpec(
    job=resolve_job(
        JobParameters(instruction="x", task=Task.GENERATE, steps=4, guidance=3.5, width=64, height=64),
        0,
        JobLimits(),
    ),
    output_format=OutputFormat.PNG,
)
RESULT = StoredResult(width=64, height=64, content_type="image/png", bytes=3)


@pytest.fixture
def stores(redis_url) -> Store:
    return Store.connect(redis.Redis.from_url(redis_url), prefix=f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture
def store(stores: Store) -> JobStore:
    return stores.jobs


def new_job(store: JobStore, images: list[bytes] | None = None, owner: str = "alice") -> JobRecord:
    return store.create(owner=owner, spec=SPEC, images=images or [], ttl_s=60)


def test_the_scripts_ship_as_package_resources():
    names = {p.name for p in resources.files("workers.store").joinpath("lua").iterdir()}
    scripts = ("claim", "finish", "requeue_lost", "cancel", "progress", "renew", "release")
    assert {f"{name}.lua" for name in scripts} <= names


def test_the_record_round_trips_typed(store):
    job = new_job(store, [b"one"])
    record = store.get(job.id)
    assert record.spec == SPEC and record.progress == Progress()
    assert record.metadata is None and record.error is None and record.result is None
    assert record.deadline_at is None and record.cancel_requested is False


def test_create_queues_with_positions_and_inputs(store):
    first, second = new_job(store, [b"one", b"two"]), new_job(store)
    assert first.status is JobStatus.QUEUED and first.owner == "alice"
    assert store.queue_position(first.id) == 1 and store.queue_position(second.id) == 2
    assert store.images(first.id) == [b"one", b"two"]
    assert [e.type for e in store.events(first.id)] == ["queued"]
    assert 0 < store.redis.ttl(store.keys.job(first.id)) <= 60


def test_unknown_ids_are_none(store):
    # Whose job it is, and what a missing one means to a caller, is the service's to decide.
    assert store.get("j_does_not_exist") is None
    assert store.get("../etc/passwd") is None


def test_claim_is_exclusive_and_a_second_delivery_is_skipped(store):
    job = new_job(store)
    first = store.claim(job.id, worker="w1", lease_ttl_s=5)
    second = store.claim(job.id, worker="w2", lease_ttl_s=5)
    assert first.claimed and first.attempt == 1
    assert not second.claimed and second.outcome is ClaimOutcome.RUNNING
    record = store.get(job.id)
    assert record.status is JobStatus.RUNNING and record.worker == "w1" and record.attempts == 1
    assert store.queue_position(job.id) is None
    assert store.claim("j_missing", worker="w1", lease_ttl_s=5).outcome is ClaimOutcome.MISSING


def test_finish_writes_once_and_only_for_the_owning_run(store):
    job = new_job(store, [b"img"])
    claim = store.claim(job.id, worker="w1", lease_ttl_s=5)
    assert not store.finish(job.id, "not-the-token", JobStatus.SUCCEEDED, ttl_s=60)
    assert store.finish(
        job.id,
        claim.token,
        JobStatus.SUCCEEDED,
        ttl_s=60,
        results=[(RESULT, b"PNG")],
    )
    error = ErrorInfo(code="internal", message="x")
    assert not store.finish(job.id, claim.token, JobStatus.FAILED, ttl_s=60, error=error)
    record = store.get(job.id)
    assert record.status is JobStatus.SUCCEEDED and record.error is None and record.result == RESULT
    assert store.result(job.id) == b"PNG"
    assert store.images(job.id) == []  # inputs are dropped once the job ends
    assert [e.type for e in store.events(job.id)] == ["queued", "started", "succeeded"]


def test_progress_from_a_stale_run_is_ignored(store):
    job = new_job(store)
    claim = store.claim(job.id, worker="w1", lease_ttl_s=5)
    assert store.progress(job.id, claim.token, Progress(stage="denoise", step=3, total=30))
    assert not store.progress(job.id, "stale", Progress(stage="denoise", step=29, total=30))
    assert store.get(job.id).progress == Progress(stage="denoise", step=3, total=30)


def test_a_preview_goes_to_the_event_stream_not_the_job(store):
    job = new_job(store)
    claim = store.claim(job.id, worker="w1", lease_ttl_s=5)
    preview = "data:image/jpeg;base64,/9j/4AAQ"
    with_preview = ProgressEvent(stage="denoise", step=5, total=6, preview=preview)
    assert store.progress(job.id, claim.token, with_preview)
    # The job keeps the latest progress without its preview (reading a job stays small).
    kept = json.loads(store.redis.hget(store.keys.job(job.id), "progress"))
    assert kept == {"stage": "denoise", "step": 5, "total": 6}
    assert store.progress(job.id, claim.token, ProgressEvent(stage="denoise", step=6, total=6))
    assert store.get(job.id).progress == Progress(stage="denoise", step=6, total=6)
    assert [event.data for event in store.events(job.id) if event.type == "progress"] == [
        {"stage": "denoise", "step": 5, "total": 6, "preview": preview},
        {"stage": "denoise", "step": 6, "total": 6},
    ]


def test_a_lapsed_lease_is_requeued_and_the_old_run_cannot_write(store):
    job = new_job(store)
    old = store.claim(job.id, worker="w1", lease_ttl_s=0.2)
    assert store.requeue_lost(max_attempts=3) == []  # lease still alive
    time.sleep(0.3)
    assert store.requeue_lost(max_attempts=3) == [(job.id, RequeueOutcome.REQUEUED)]
    assert store.get(job.id).status is JobStatus.QUEUED and store.queue_position(job.id) == 1
    new = store.claim(job.id, worker="w2", lease_ttl_s=5)
    assert new.claimed and new.attempt == 2
    assert not store.finish(job.id, old.token, JobStatus.SUCCEEDED, ttl_s=60, results=[(RESULT, b"old")])
    assert store.finish(job.id, new.token, JobStatus.SUCCEEDED, ttl_s=60, results=[(RESULT, b"new")])
    assert store.result(job.id) == b"new"


def test_a_pair_of_results_is_stored_under_two_keys(store):
    job = new_job(store)
    claim = store.claim(job.id, worker="w1", lease_ttl_s=5)
    second = RESULT.model_copy(update={"bytes": 6})
    assert store.finish(
        job.id, claim.token, JobStatus.SUCCEEDED, ttl_s=60, results=[(RESULT, b"A"), (second, b"B")]
    )
    record = store.get(job.id)
    assert record.result == RESULT and record.all_results == [RESULT, second]
    assert (store.result(job.id), store.result(job.id, 1), store.result(job.id, 2)) == (b"A", b"B", None)
    assert 0 < store.redis.ttl(store.keys.result(job.id, 1)) <= 60


def test_a_requeued_job_takes_back_its_place_in_line(store):
    lost = new_job(store)
    store.claim(lost.id, worker="w1", lease_ttl_s=0.2)
    later = [new_job(store) for _ in range(2)]  # submitted while it ran
    time.sleep(0.3)
    assert store.requeue_lost(max_attempts=3) == [(lost.id, RequeueOutcome.REQUEUED)]
    assert store.queued_ids() == [lost.id, *(job.id for job in later)]


def test_a_run_takes_back_a_lease_that_lapsed_while_redis_was_away(store):
    job = new_job(store)
    claim = store.claim(job.id, worker="w1", lease_ttl_s=0.2)
    time.sleep(0.3)  # the lease lapsed; nobody requeued the job (Redis was away, say)
    assert store.renew_lease(job.id, claim.token, 5)
    assert store.requeue_lost(max_attempts=3) == []
    # Once another run owns the job, the old one gets nothing back.
    store.redis.delete(store.keys.lease(job.id))
    assert store.requeue_lost(max_attempts=3) == [(job.id, RequeueOutcome.REQUEUED)]
    assert not store.renew_lease(job.id, claim.token, 5)  # queued now: not this run's
    new = store.claim(job.id, worker="w2", lease_ttl_s=5)
    store.redis.delete(store.keys.lease(job.id))
    assert not store.renew_lease(job.id, claim.token, 5) and store.renew_lease(job.id, new.token, 5)


def test_the_reaper_waits_after_a_redis_restart(store):
    job = new_job(store)
    store.claim(job.id, worker="w1", lease_ttl_s=0.1)
    time.sleep(0.2)
    uptime = int(store.redis.info("server")["uptime_in_seconds"])
    assert store.requeue_lost(max_attempts=3, restart_grace_s=uptime + 60) == []  # "just restarted"
    assert store.requeue_lost(max_attempts=3, restart_grace_s=0) == [(job.id, RequeueOutcome.REQUEUED)]


def test_renewing_keeps_the_lease(store):
    job = new_job(store)
    claim = store.claim(job.id, worker="w1", lease_ttl_s=0.3)
    for _ in range(4):
        time.sleep(0.15)
        assert store.renew_lease(job.id, claim.token, 0.3)
    assert store.requeue_lost(max_attempts=3) == []
    assert not store.renew_lease(job.id, "other", 0.3)


def test_a_released_job_is_requeued_at_the_next_pass_with_its_attempt_counted(store):
    # What a worker whose GPU failed for good does with its job: no outcome, the lease dropped at once.
    job = new_job(store)
    run = store.claim(job.id, worker="w1", lease_ttl_s=60)
    assert not store.release(job.id, "another run")
    assert store.requeue_lost(max_attempts=3) == []  # the lease still holds
    assert store.release(job.id, run.token)
    assert not store.release(job.id, run.token)
    record = store.get(job.id)
    assert record.status is JobStatus.RUNNING and record.error is None and record.attempts == 1
    assert store.requeue_lost(max_attempts=3) == [(job.id, RequeueOutcome.REQUEUED)]
    again = store.claim(job.id, worker="w2", lease_ttl_s=60)
    assert again.claimed and again.attempt == 2
    # The released run cannot touch the run that replaced it.
    assert not store.release(job.id, run.token) and store.redis.exists(store.keys.lease(job.id))
    # Out of attempts, a released job fails `worker_lost`, as a dead worker's does.
    assert store.release(job.id, again.token)
    assert store.requeue_lost(max_attempts=2) == [(job.id, RequeueOutcome.FAILED)]
    assert store.get(job.id).error.code == "worker_lost"


def test_out_of_attempts_fails_with_worker_lost(store):
    job = new_job(store, [b"img"])
    store.claim(job.id, worker="w1", lease_ttl_s=0.1)
    time.sleep(0.2)
    assert store.requeue_lost(max_attempts=1) == [(job.id, RequeueOutcome.FAILED)]
    record = store.get(job.id)
    assert record.status is JobStatus.FAILED and record.error.code == "worker_lost"
    assert store.images(job.id) == []
    assert store.events(job.id)[-1].type == "failed"


def test_wait_until_terminal_wakes_on_the_final_event(store):
    job = new_job(store)
    claim = store.claim(job.id, worker="w1", lease_ttl_s=5)
    assert store.wait_until_terminal(job.id, 0.2).status is JobStatus.RUNNING

    threading.Timer(0.2, lambda: store.finish(job.id, claim.token, JobStatus.SUCCEEDED, ttl_s=60)).start()
    started = time.monotonic()
    assert store.wait_until_terminal(job.id, 10).status is JobStatus.SUCCEEDED
    assert time.monotonic() - started < 5


def test_prune_drops_queue_entries_of_expired_jobs(store):
    job = new_job(store)
    store.redis.delete(store.keys.job(job.id))
    assert store.prune_queue() == 1
    assert store.queue_depth() == 0


def test_worker_registry(stores):
    stores.workers.announce("w1", {"name": "w1", "ready": True}, ttl_s=5)
    stores.workers.announce("w2", {"name": "w2", "ready": False}, ttl_s=5)
    assert sorted(w["name"] for w in stores.workers.workers()) == ["w1", "w2"]
    stores.workers.retire("w1")
    assert [w["name"] for w in stores.workers.workers()] == ["w2"]


def test_idempotency_reservations(stores):
    keys = stores.idempotency
    assert keys.reserve("alice", "k1", "body-a", ttl_s=60).outcome is Reservation.NEW
    assert keys.reserve("alice", "k1", "body-b", ttl_s=60).outcome is Reservation.BODY_MISMATCH
    # Another owner's key of the same name is another key.
    assert keys.reserve("bob", "k1", "body-b", ttl_s=60).outcome is Reservation.NEW
    keys.complete("alice", "k1", "body-a", "j_1", ttl_s=60)
    replay = keys.reserve("alice", "k1", "body-a", ttl_s=60)
    assert replay.outcome is Reservation.REPLAY and replay.job_id == "j_1"
    keys.release("bob", "k1")
    assert keys.reserve("bob", "k1", "body-c", ttl_s=60).outcome is Reservation.NEW


def test_a_key_still_being_created_is_in_progress(stores, monkeypatch):
    import workers.store.idempotency as idempotency

    monkeypatch.setattr(idempotency, "WAIT_FOR_FIRST_S", 0.1)
    assert stores.idempotency.reserve("alice", "k2", "body", ttl_s=60).outcome is Reservation.NEW
    assert stores.idempotency.reserve("alice", "k2", "body", ttl_s=60).outcome is Reservation.IN_PROGRESS


def test_a_job_queued_in_the_earlier_spec_layout_reads_as_the_same_resolved_job():
    # Before the resolved job was stored whole, a spec kept its parameters, task, adapter and image
    # count side by side; a job queued then still runs after an upgrade.
    earlier = {
        "params": SPEC.job.parameters().model_dump(mode="json"),
        "task": "generate",
        "adapter": "base",
        "image_count": 0,
        "output_format": "png",
    }
    assert JobSpec.model_validate_json(json.dumps(earlier)) == SPEC


def test_discard_leaves_nothing_of_a_job_no_worker_took(stores):
    # The gateway's way out when a new job's write did not reach its replicas: as if never submitted.
    store, k = stores.jobs, stores.keys
    stores.quotas.admit("alice", "j_pending", Limits(rate=10, burst=10, active=10), 100, 60)
    job = store.create(owner="alice", spec=SPEC, images=[b"in"], ttl_s=60, deadline_s=30, job_id="j_pending")
    idem = k.idempotency("alice", "order-1")
    stores.idempotency.complete("alice", "order-1", "body", job.id, 60)
    assert store.discard(job.id, "alice", also_delete=[idem]) is DiscardOutcome.DELETED
    for key in (k.job(job.id), k.images(job.id), k.events(job.id), idem):
        assert not stores.redis.exists(key), key
    assert store.queue_depth() == 0 and not stores.redis.zscore(k.deadlines, job.id)
    assert not stores.redis.sismember(k.active_jobs("alice"), job.id)
    assert store.discard(job.id, "alice", also_delete=[idem]) is DiscardOutcome.MISSING


def test_discard_keeps_a_job_a_worker_took(store):
    job = new_job(store)
    assert store.claim(job.id, worker="w1", lease_ttl_s=10).claimed
    assert store.discard(job.id, "alice") is DiscardOutcome.TAKEN
    assert store.get(job.id).status is JobStatus.RUNNING


def test_replicate_without_replicas_reports_none_after_its_timeout(store):
    job = new_job(store)
    started = time.monotonic()
    assert store.replicate(job.id, 60, 1, timeout_ms=100) == 0
    assert time.monotonic() - started >= 0.1
    assert store.replicate("j_gone", 60, 1, timeout_ms=100) == 0  # nothing to copy: nothing reached

"""DREAMOMNI2_REDIS_MIN_REPLICAS: a job whose write cannot reach that many replicas is not created.

The session's Redis has no replica, so every submission here waits out the gateway's WAIT and is
refused: 503 with Retry-After, and nothing stored (the tests of a Sentinel-managed Redis with a replica,
where it is answered 202, are `tests/workers/test_connection.py` and the failover test)."""

from __future__ import annotations

import pytest

from tests.app.conftest import Gateway

pytestmark = pytest.mark.anyio

JOB = {"instruction": "a cat", "deadline_s": 60}


@pytest.mark.settings(redis_min_replicas=1)
async def test_a_job_that_reaches_too_few_replicas_is_503_and_leaves_nothing(gateway: Gateway) -> None:
    alice = gateway.client("alice")
    store = gateway.service.store
    headers = {"Idempotency-Key": "order-7"}
    refused = await alice.post("/v1/jobs", json=JOB, headers=headers)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "2"
    error = refused.json()["error"]
    assert error["code"] == "unavailable" and error["details"] == {"replicas": 0, "min_replicas": 1}
    # No job, no place in the queue or among the deadlines, no job slot, no Idempotency-Key record.
    assert not list(store.redis.scan_iter(match=f"{store.keys.prefix}:job:*"))
    assert store.jobs.queue_depth() == 0 and not store.redis.zcard(store.keys.deadlines)
    assert not store.redis.scard(store.keys.active_jobs("alice"))
    assert not store.redis.exists(store.keys.idempotency("alice", "order-7"))
    # So the retry with the same key is a new attempt (refused the same way), not a replay or a 409.
    again = await alice.post("/v1/jobs", json=JOB, headers=headers)
    assert again.status_code == 503 and again.json()["error"]["code"] == "unavailable"
    metrics = (await alice.get("/metrics")).text
    assert 'dreamomni2_jobs_rejected_total{code="unavailable"} 2.0' in metrics

"""Quotas: per-key token bucket and active jobs, the global queue cap; 429 with the standard headers."""

from __future__ import annotations

import asyncio

import pytest

from tests.app.conftest import Gateway

pytestmark = pytest.mark.anyio

JOB = {"instruction": "a cat"}


def assert_429(response, code: str, limit: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["details"]["limit"] == limit
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["ratelimit-policy"].startswith(f'"{limit}";q=')
    assert response.headers["ratelimit"].startswith(f'"{limit}";r=0;t=')


@pytest.mark.settings(rate_limit_per_s=0.5, rate_limit_burst=3)
async def test_a_burst_beyond_the_bucket_is_429_and_refused_before_anything_is_stored(gateway: Gateway):
    alice, bob = gateway.client("alice"), gateway.client("bob")
    answers = await asyncio.gather(*(alice.post("/v1/jobs", json=JOB) for _ in range(5)))
    assert sorted(r.status_code for r in answers) == [202, 202, 202, 429, 429]
    refused = next(r for r in answers if r.status_code == 429)
    assert_429(refused, "rate_limited", "rate")
    assert "0.5 jobs per second" in refused.json()["error"]["message"]
    assert gateway.service.store.jobs.queue_depth() == 3  # nothing stored for the refusals
    assert (await bob.post("/v1/jobs", json=JOB)).status_code == 202  # each key has its own bucket
    # Reads and health stay answered while submissions are refused.
    job_id = next(r for r in answers if r.status_code == 202).json()["id"]
    assert (await alice.get(f"/v1/jobs/{job_id}")).status_code == 200
    assert (await alice.get("/healthz")).status_code == 200
    metrics = (await alice.get("/metrics")).text
    assert 'dreamomni2_jobs_rejected_total{code="rate_limited"} 2.0' in metrics


@pytest.mark.settings(max_active_jobs_per_key=2)
async def test_active_jobs_per_key_are_capped_and_a_cancel_frees_a_slot(gateway: Gateway):
    alice = gateway.client("alice")
    first, second = [(await alice.post("/v1/jobs", json=JOB)).json() for _ in range(2)]
    assert_429(await alice.post("/v1/jobs", json=JOB), "active_jobs_limit", "active")
    assert (await gateway.client("bob").post("/v1/jobs", json=JOB)).status_code == 202
    assert (await alice.post(f"/v1/jobs/{first['id']}/cancel")).status_code == 200
    assert (await alice.post("/v1/jobs", json=JOB)).status_code == 202
    assert second["status"] == "queued"


@pytest.mark.settings(max_queue_depth=2)
async def test_the_queue_has_a_global_cap(gateway: Gateway):
    assert (await gateway.client("alice").post("/v1/jobs", json=JOB)).status_code == 202
    assert (await gateway.client("bob").post("/v1/jobs", json=JOB)).status_code == 202
    refused = await gateway.client("alice").post("/v1/jobs", json=JOB)
    assert_429(refused, "queue_full", "queue")
    assert "DREAMOMNI2_MAX_QUEUE_DEPTH" in refused.json()["error"]["message"]


@pytest.mark.settings(key_limits={"bob": {"active": 1}})
async def test_limits_are_configurable_per_key(gateway: Gateway):
    bob = gateway.client("bob")
    assert (await bob.post("/v1/jobs", json=JOB)).status_code == 202
    assert_429(await bob.post("/v1/jobs", json=JOB), "active_jobs_limit", "active")
    alice = gateway.client("alice")
    assert all([(await alice.post("/v1/jobs", json=JOB)).status_code == 202 for _ in range(3)])


@pytest.mark.settings(max_active_jobs_per_key=1)
async def test_an_idempotent_replay_is_not_counted_again(gateway: Gateway):
    alice = gateway.client("alice")
    headers = {"Idempotency-Key": "order-1"}
    first = await alice.post("/v1/jobs", json=JOB, headers=headers)
    again = await alice.post("/v1/jobs", json=JOB, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true" and again.json()["id"] == first.json()["id"]


def test_key_limits_come_from_json_in_the_environment(monkeypatch):
    from app.settings import GatewaySettings

    monkeypatch.setenv("DREAMOMNI2_KEY_LIMITS", '{"batch": {"rate": 1, "burst": 5}}')
    limits = GatewaySettings().key_limits["batch"]
    assert (limits.rate, limits.burst, limits.active) == (1, 5, None)
    monkeypatch.setenv("DREAMOMNI2_KEY_LIMITS", '{"batch": {"rate": 0}}')
    with pytest.raises(ValueError, match="greater than 0"):
        GatewaySettings()

"""Error mapping: every refusal in the one envelope with a catalogued code, and the bugs that were fixed."""

from __future__ import annotations

import logging

import pytest
import redis

from api_schemas.api import JobStatus
from api_schemas.common import WebhookEvent
from api_schemas.errors import ERROR_CODES, ErrorCode
from tests.app.conftest import Gateway
from workers.config import ServiceSettings
from workers.store import Store
from workers.webhooks import Notifier

pytestmark = pytest.mark.anyio


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert ERROR_CODES[ErrorCode(code)].status == status
    return error


async def test_keys(gateway: Gateway):
    missing = await gateway.client(None).get("/v1/jobs/j_x")
    assert_error(missing, 401, "missing_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = await gateway.client(None).get("/v1/jobs/j_x", headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "invalid_api_key")
    basic = await gateway.client(None).get("/v1/jobs/j_x", headers={"Authorization": "Basic YTpi"})
    assert_error(basic, 401, "missing_api_key")
    assert (await gateway.client(None).get("/healthz")).status_code == 200  # operations need no key


async def test_another_keys_job_is_not_found(gateway: Gateway):
    job = (await gateway.client("alice").post("/v1/jobs", json={"instruction": "a cat"})).json()
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/result", f"/v1/jobs/{job['id']}/events"):
        assert_error(await gateway.client("bob").get(path), 404, "job_not_found")
    assert_error(await gateway.client("bob").post(f"/v1/jobs/{job['id']}/cancel"), 404, "job_not_found")


async def test_routes_and_methods(gateway: Gateway):
    assert_error(await gateway.client().get("/v2/nothing"), 404, "not_found")
    assert_error(await gateway.client().delete("/v1/jobs"), 405, "method_not_allowed")


async def test_result_and_cancel_follow_the_job(gateway: Gateway):
    client = gateway.client()
    job = (await client.post("/v1/jobs", json={"instruction": "a cat"})).json()
    assert_error(await client.get(f"/v1/jobs/{job['id']}/result"), 409, "job_not_finished")
    canceled = await client.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert_error(await client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_finished")
    assert_error(await client.get(f"/v1/jobs/{job['id']}/result"), 409, "job_canceled")


async def test_a_succeeded_job_whose_image_expired_is_404_result_expired(gateway: Gateway):
    client = gateway.client()
    job = (await client.post("/v1/jobs", json={"instruction": "a cat"})).json()
    jobs = gateway.service.store.jobs
    claim = jobs.claim(job["id"], worker="w", lease_ttl_s=5)
    assert jobs.finish(job["id"], claim.token, JobStatus.SUCCEEDED, ttl_s=60)  # no image stored
    assert_error(await client.get(f"/v1/jobs/{job['id']}/result"), 404, "result_expired")


async def test_cancelling_a_job_that_expires_meanwhile_is_404(gateway: Gateway):
    client = gateway.client()
    job = (await client.post("/v1/jobs", json={"instruction": "a cat"})).json()
    jobs = gateway.service.store.jobs
    real_cancel = jobs.cancel

    def expire_then_cancel(job_id: str, **kwargs: object):
        jobs.redis.delete(jobs.keys.job(job_id))  # the job's TTL runs out between the two reads
        return real_cancel(job_id, **kwargs)

    jobs.cancel = expire_then_cancel
    try:
        assert_error(await client.post(f"/v1/jobs/{job['id']}/cancel"), 404, "job_not_found")
    finally:
        jobs.cancel = real_cancel


async def test_a_job_claimed_between_its_two_reads_shows_running_not_queued_nowhere(gateway: Gateway):
    client = gateway.client()
    job = (await client.post("/v1/jobs", json={"instruction": "a cat"})).json()
    jobs = gateway.service.store.jobs
    real_get = jobs.get

    def claim_after_reading(job_id: str):
        record = real_get(job_id)  # read while queued; a worker claims it before its place is read
        if record is not None and record.status is JobStatus.QUEUED:
            assert jobs.claim(job_id, worker="w", lease_ttl_s=5).claimed
        return record

    jobs.get = claim_after_reading
    try:
        shown = (await client.get(f"/v1/jobs/{job['id']}")).json()
    finally:
        jobs.get = real_get
    assert (shown["status"], shown["queue_position"]) == ("running", None), shown


async def test_redis_down_is_503_and_readiness_says_so(redis_url: str):
    from app.main import create_app
    from tests.app.conftest import settings_for

    app = create_app(settings_for("redis://127.0.0.1:1/0"))
    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
            response = await client.get("/v1/jobs/j_x", headers={"Authorization": "Bearer do2_alice_key"})
            assert_error(response, 503, "unavailable")
            assert response.headers["retry-after"] == "2"
            submitted = await client.post(
                "/v1/jobs", json={"instruction": "a cat"}, headers={"Authorization": "Bearer do2_alice_key"}
            )
            assert_error(submitted, 503, "unavailable")
            assert submitted.headers["retry-after"] == "2"


async def test_readiness(gateway: Gateway):
    # Keys are on: a probe without one learns the status only, not the workers or the queue.
    anonymous = await gateway.client(None).get("/readyz")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready", "redis": "ok"}
    wrong = await gateway.client(None).get("/readyz", headers={"Authorization": "Bearer nope"})
    assert wrong.json() == {"status": "ready", "redis": "ok"}
    ready = await gateway.client("alice").get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "redis": "ok",
        "workers": {"up": 0, "ready": 0, "memory_modes": {}, "speed_fallbacks": {}},
        "queue_depth": 0,
    }


async def test_readiness_counts_workers_serving_a_speed_fallback(gateway: Gateway):
    # The readiness info workers announce (`Engine.describe()` under `memory`), as the registry holds it.
    registry = gateway.service.store.workers
    compiled = {"profile": "compiled", "attention_backend": "sdpa"}
    announced = {
        "serving": {"ready": True, "memory": {"mode": "resident", "speed": compiled}},
        "no-compiler": {
            "ready": True,
            "memory": {
                "mode": "resident",
                "speed": {**compiled, "fallback": "reference", "error": "InvalidCxxCompiler: ..."},
            },
        },
        "failed-warm-up": {
            "ready": True,
            "memory": {"mode": "balanced", "speed": {**compiled, "fallback": "eager", "error": "..."}},
        },
        "loading": {"ready": False},
    }
    for name, info in announced.items():
        registry.announce(name, {"name": name, **info}, ttl_s=30)
    try:
        ready = (await gateway.client("alice").get("/readyz")).json()
        anonymous = (await gateway.client(None).get("/readyz")).json()
    finally:
        for name in announced:
            registry.retire(name)

    assert ready["workers"] == {
        "up": 4,
        "ready": 3,
        "memory_modes": {"resident": 2, "balanced": 1},
        "speed_fallbacks": {"reference": 1, "eager": 1},
    }
    assert anonymous == {"status": "ready", "redis": "ok"}  # worker details are for callers with a key


def test_a_notification_that_cannot_reach_redis_is_logged(caplog: pytest.LogCaptureFixture):
    settings = ServiceSettings(redis_url="redis://127.0.0.1:1/0")
    store = Store.connect(redis.Redis.from_url(settings.redis_url, socket_connect_timeout=0.5))
    notifier = Notifier(store, celery=None, settings=settings)
    with caplog.at_level(logging.ERROR, logger="workers.webhooks"):
        assert notifier.notify("j_x", WebhookEvent.COMPLETED) is None
    assert "could not store the completed webhook of job j_x" in caplog.text


async def test_head_answers_wherever_get_does_without_a_body(gateway: Gateway):
    client = gateway.client()
    job = (await client.post("/v1/jobs", json={"instruction": "a cat"})).json()
    for path in ("/healthz", "/readyz", f"/v1/jobs/{job['id']}", "/", "/docs"):
        get, head = await client.get(path), await client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
    # A stream that would go on (the job waits, no worker): HEAD answers with its headers at once.
    stream = await client.head(f"/v1/jobs/{job['id']}/events")
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    assert (await client.head(f"/v1/jobs/{job['id']}/result")).status_code == 409
    assert (await client.head("/v1/nothing")).status_code == 404

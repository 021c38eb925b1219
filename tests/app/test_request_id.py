"""X-Request-ID: taken from the caller or made, on every answer and error body, kept with the job."""

from __future__ import annotations

import re

import pytest

from tests.app.conftest import Gateway

pytestmark = pytest.mark.anyio

FRESH = re.compile(r"[0-9a-f]{32}")


async def test_the_callers_id_is_echoed_and_stored_with_the_job(gateway: Gateway):
    sent = "order-7731/render:2@client.example=1"
    response = await gateway.client().post(
        "/v1/jobs", json={"instruction": "a cat"}, headers={"X-Request-ID": sent}
    )
    assert response.status_code == 202 and response.headers["x-request-id"] == sent
    record = gateway.service.store.jobs.get(response.json()["id"])
    assert record is not None and record.request_id == sent
    assert record.traceparent is None  # tracing is off here


async def test_a_request_without_one_gets_a_fresh_id_each_time(gateway: Gateway):
    client = gateway.client()
    first, second = (await client.get("/healthz")), (await client.get("/v1/service"))
    assert FRESH.fullmatch(first.headers["x-request-id"]) and FRESH.fullmatch(second.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize(
    "value",
    ["", "   ", "x" * 129, "two words", "semi;colon", 'quote"d', "é".encode("latin-1")],
    ids=["empty", "blank", "overlong", "space", "semicolon", "quote", "latin-1"],
)
async def test_an_unusable_id_is_replaced_never_refused(gateway: Gateway, value: str | bytes):
    response = await gateway.client().post(
        "/v1/jobs", json={"instruction": "a cat"}, headers={"X-Request-ID": value}
    )
    assert response.status_code == 202, response.text
    assert FRESH.fullmatch(response.headers["x-request-id"])


@pytest.mark.settings(max_request_bytes=1000)
async def test_every_error_body_names_the_request(gateway: Gateway):
    client = gateway.client()
    answers = {
        "job_not_found": await client.get("/v1/jobs/j_missing", headers={"X-Request-ID": "r-404"}),
        "not_found": await client.get("/no/such/route"),
        "invalid_request": await client.post("/v1/jobs", json={"instruction": "a cat", "steps": "many"}),
        "missing_api_key": await gateway.client(None).get("/v1/jobs/j_missing"),
        "payload_too_large": await client.post("/v1/jobs", content=b"x" * 2000),
        "method_not_allowed": await client.delete("/v1/jobs"),
    }
    for code, response in answers.items():
        error = response.json()["error"]
        assert error["code"] == code, response.text
        assert error["request_id"] == response.headers["x-request-id"], code
    assert answers["job_not_found"].json()["error"]["request_id"] == "r-404"


@pytest.mark.settings(cors_origins="https://app.example.com")
async def test_browsers_may_send_and_read_the_header(gateway: Gateway):
    client = gateway.client(None)
    preflight = await client.options(
        "/v1/jobs",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-request-id",
        },
    )
    assert (
        preflight.status_code == 200
        and "x-request-id" in preflight.headers["access-control-allow-headers"].lower()
    )
    job = await gateway.client().post(
        "/v1/jobs", json={"instruction": "a cat"}, headers={"Origin": "https://app.example.com"}
    )
    assert "x-request-id" in job.headers["access-control-expose-headers"].lower()
    refused = await client.options(
        "/v1/jobs", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert refused.json()["error"]["request_id"] == refused.headers["x-request-id"]

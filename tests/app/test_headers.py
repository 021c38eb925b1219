"""Headers: Prefer, Cancel-After, Idempotency-Key, Last-Event-ID, each parsed once and refused clearly."""

from __future__ import annotations

import time

import pytest

from tests.app.conftest import Gateway

pytestmark = pytest.mark.anyio


async def test_prefer_wait_holds_then_answers_202_when_the_job_is_not_done(gateway: Gateway):
    started = time.monotonic()
    response = await gateway.client().post(
        "/v1/jobs", json={"instruction": "a cat"}, headers={"Prefer": "respond-async, wait=1"}
    )
    assert response.status_code == 202 and response.headers["preference-applied"] == "wait=1"
    assert time.monotonic() - started >= 0.9  # no worker: it waited the whole second


async def test_prefer_wait_is_capped_and_other_preferences_are_ignored(gateway: Gateway):
    client = gateway.client()
    capped = await client.post("/v1/jobs", json={"instruction": "a cat"}, headers={"Prefer": "wait=0"})
    assert capped.status_code == 202 and capped.headers["preference-applied"] == "wait=0"
    other = await client.post("/v1/jobs", json={"instruction": "a cat"}, headers={"Prefer": "return=minimal"})
    assert other.status_code == 202 and "preference-applied" not in other.headers


@pytest.mark.parametrize("value", ["abc", "-1", "0", "nan", "", "1e999"])
async def test_a_bad_cancel_after_is_422(gateway: Gateway, value: str):
    response = await gateway.client().post(
        "/v1/jobs", json={"instruction": "a cat"}, headers={"Cancel-After": value}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert "Cancel-After" in response.json()["error"]["message"]


async def test_cancel_after_sets_the_deadline(gateway: Gateway):
    response = await gateway.client().post(
        "/v1/jobs", json={"instruction": "a cat"}, headers={"Cancel-After": "120"}
    )
    assert response.status_code == 202 and response.json()["deadline_at"] is not None


async def test_an_overlong_idempotency_key_is_422(gateway: Gateway):
    response = await gateway.client().post(
        "/v1/jobs", json={"instruction": "a cat"}, headers={"Idempotency-Key": "k" * 256}
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


async def test_a_bad_last_event_id_is_refused_before_the_stream(gateway: Gateway):
    client = gateway.client()
    job = (await client.post("/v1/jobs", json={"instruction": "a cat"})).json()
    response = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "not-an-id"})
    assert response.status_code == 422 and "Last-Event-ID" in response.json()["error"]["message"]


async def test_the_stream_of_a_finished_job_ends_with_its_final_event(gateway: Gateway):
    client = gateway.client()
    job = (await client.post("/v1/jobs", json={"instruction": "a cat"})).json()
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
    async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        text = "".join([chunk async for chunk in stream.aiter_text()])
    events = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert events == ["queued", "canceled"]


@pytest.mark.parametrize("value", ["", "   "])
async def test_an_empty_idempotency_key_is_422_not_a_shared_key(gateway: Gateway, value: str):
    client = gateway.client()
    for _ in range(2):  # the second is refused the same way, not `idempotency_key_reused`
        response = await client.post(
            "/v1/jobs", json={"instruction": "a cat"}, headers={"Idempotency-Key": value}
        )
        assert response.status_code == 422, response.text
        assert "Idempotency-Key is empty" in response.json()["error"]["message"]


@pytest.mark.parametrize("value", [str(2**64), f"1-{2**64}", "99999999999999999999"])
async def test_a_last_event_id_beyond_64_bits_is_refused_before_the_stream(gateway: Gateway, value: str):
    client = gateway.client()
    job = (await client.post("/v1/jobs", json={"instruction": "a cat"})).json()
    response = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": value})
    assert response.status_code == 422 and "Last-Event-ID" in response.json()["error"]["message"]


async def test_reconnecting_after_the_final_event_answers_204(gateway: Gateway):
    # A browser's EventSource reconnects after every close; 204 is what makes it stop.
    client = gateway.client()
    job = (await client.post("/v1/jobs", json={"instruction": "a cat"})).json()
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
    async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        text = "".join([chunk async for chunk in stream.aiter_text()])
    ids = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("id: ")]
    final, first = ids[-1], ids[0]
    again = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": final})
    assert again.status_code == 204 and again.content == b""
    # Resuming before the end still gets what came after, ending with the final event.
    async with client.stream(
        "GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": first}
    ) as stream:
        text = "".join([chunk async for chunk in stream.aiter_text()])
    assert [line for line in text.splitlines() if line.startswith("event: ")] == ["event: canceled"]

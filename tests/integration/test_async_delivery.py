"""Async delivery on the real stack: signed webhooks and their retries, the SSE event stream (resumed
after a reconnect, on another gateway), cancel, idempotent replays and deadlines.

The main stack signs webhooks (alice with her own secret, bob with the deployment's), admits receivers on
127.0.0.1 and retries after 0.3 s, 0.6 s, ... A second gateway on the same Redis has neither the
loopback allowlist nor a deployment secret (alice keeps hers), for the refusals and as a replica.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from app.stack import LocalStack, free_port

from .conftest import Service
from .support import (
    LONG_STEPS,
    MAX_STEPS,
    TERMINAL,
    WEBHOOK_BACKOFF_S,
    ServerSentEvent,
    StoreSnapshot,
    WebhookReceiver,
    assert_error,
    event_id_key,
    example_images,
    get_job,
    is_denoising,
    new_webhook_secret,
    sse_events,
    stack_env,
    submit_json,
    submit_multipart,
    wait_for_job,
    wait_for_status,
    wait_until,
)

UNKNOWN_JOB = "j_" + "0" * 32


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def strict_gateway(main_stack: LocalStack) -> Iterator[str]:
    """The URL of a second gateway on the main stack's Redis: no loopback allowlist, no deployment
    webhook secret (alice keeps her own, so only bob has none)."""
    port = free_port()
    env = {"DREAMOMNI2_WEBHOOK_SECRET": "", "DREAMOMNI2_WEBHOOK_ALLOWLIST": ""}
    gateway = main_stack.start_gateway(port=port, env=env)
    yield f"http://127.0.0.1:{port}"
    gateway.stop()


@pytest.fixture
def long_job(service: Service, alice: httpx.Client) -> Iterator[Callable[[], dict[str, Any]]]:
    """Starts a job that keeps the one worker busy (it would take ~15 s) and returns it once it is
    denoising; any still running after the test is canceled."""
    started: list[str] = []

    def start() -> dict[str, Any]:
        job = submit(alice, {"instruction": "Keep the worker busy", "steps": MAX_STEPS})
        started.append(job["id"])
        return wait_for_job(
            alice, job["id"], is_denoising, what="the long job to denoise", watch=service.core
        )

    yield start
    for job_id in started:
        alice.post(f"/v1/jobs/{job_id}/cancel")  # 409 once it has ended: nothing to do


def submit(client: httpx.Client, fields: dict[str, Any], headers: dict[str, str] | None = None) -> dict:
    """Submit a generation (no images) as JSON; returns the job object."""
    response = submit_json(client, [], {"instruction": "A lighthouse at dusk", **fields}, headers)
    assert response.status_code in (200, 202), response.text
    return response.json()


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def read_events(
    client: httpx.Client,
    job_id: str,
    last_event_id: str | None = None,
    stop: Callable[[ServerSentEvent], bool] | None = None,
) -> tuple[list[ServerSentEvent], bool]:
    """Read a job's event stream until `stop(event)` holds (then hang up) or the server ends it.

    Returns the events and whether the server ended the stream.
    """
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    events: list[ServerSentEvent] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in sse_events(response):
            events.append(event)
            if stop is not None and stop(event):
                return events, False
    return events, True


def without_webhook(job: dict[str, Any]) -> dict[str, Any]:
    """The job object less `webhook`, whose last delivery moves on after a snapshot was taken."""
    return {name: value for name, value in job.items() if name != "webhook"}


# Webhooks ------------------------------------------------------------------------------------------------
def test_completed_webhook_is_retried_under_one_id_until_delivered(
    service: Service, bob: httpx.Client, receiver: WebhookReceiver
) -> None:
    url = receiver.endpoint(service.webhook_secret("bob"), answers=[500, 500, 202])
    fields = {"instruction": "A red bag", "steps": 2, "webhook_url": url}
    response = submit_json(bob, [], fields, headers={"Prefer": "wait=30"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded"
    assert (job["webhook"]["url"], job["webhook"]["events"]) == (url, ["completed"])

    attempts = receiver.wait_for(
        url, lambda got: len(got) >= 3, what="three delivery attempts", watch=service.core
    )
    delivered = wait_for_job(
        bob,
        job["id"],
        lambda job: (job["webhook"]["last_delivery"] or {}).get("status") == "delivered",
        what="the delivery to be recorded",
        watch=service.core,
    )

    assert [attempt.answered for attempt in attempts] == [500, 500, 202]
    assert all(attempt.verified for attempt in attempts)
    webhook_id = attempts[0].webhook_id
    assert webhook_id.startswith("msg_")
    assert {attempt.webhook_id for attempt in attempts} == {webhook_id}
    assert {attempt.body for attempt in attempts} == {attempts[0].body}
    assert {attempt.headers["content-type"] for attempt in attempts} == {"application/json"}
    # Backoff doubles from the first delay (0.3 s, then 0.6 s); a retry never runs early.
    first_gap, second_gap = attempts[1].at - attempts[0].at, attempts[2].at - attempts[1].at
    assert first_gap >= 0.9 * WEBHOOK_BACKOFF_S
    assert second_gap >= 0.9 * 2 * WEBHOOK_BACKOFF_S
    # The body is the finished job object.
    payload = attempts[0].payload
    assert payload["id"] == job["id"] and payload["status"] == "succeeded"
    assert without_webhook(payload) == without_webhook(delivered)
    last = delivered["webhook"]["last_delivery"]
    assert last["at"] is not None
    assert {name: last[name] for name in ("id", "event", "status", "attempts", "status_code", "error")} == {
        "id": webhook_id,
        "event": "completed",
        "status": "delivered",
        "attempts": 3,
        "status_code": 202,
        "error": None,
    }
    assert len(receiver.received(url)) == 3


def test_started_and_progress_webhooks_come_before_the_completed_one(
    service: Service, alice: httpx.Client, receiver: WebhookReceiver
) -> None:
    alice_secret = service.webhook_secret("alice")
    assert alice_secret != service.webhook_secret("bob")
    url = receiver.endpoint(alice_secret)
    fields = {
        "instruction": "A wide beach",
        "steps": 300,  # about a second: the start's deliveries are long done when it ends
        "webhook_url": url,
        "webhook_events": "started,progress,completed",  # the comma-separated form field
    }
    response = submit_multipart(alice, [], fields)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["webhook"]["events"] == ["completed", "progress", "started"]

    def kinds(got: list) -> set[str]:
        return {
            "completed" if r.payload["status"] == "succeeded" else
            "started" if r.payload["progress"]["stage"] is None else "progress"
            for r in got
        }  # fmt: skip

    # Deliveries run on a thread pool: on a busy machine the started one may land after the
    # completed one, so wait for all three kinds.
    got = receiver.wait_for(
        url,
        lambda got: kinds(got) == {"started", "progress", "completed"},
        what="the started, progress and completed deliveries",
        watch=service.core,
    )

    assert all(r.verified and r.answered == 204 for r in got)
    assert len({r.webhook_id for r in got}) == len(got)  # one id per delivery, each the first attempt
    assert all(r.payload["id"] == job["id"] for r in got)
    [completed] = [r for r in got if r.payload["status"] == "succeeded"]
    # Started: the snapshot taken as the worker claimed the job, before any progress.
    [started] = [r for r in got if r.payload["progress"] == {"stage": None, "step": 0, "total": 0}]
    progress = [r for r in got if r not in (started, completed)]
    assert started.payload["status"] == "running" and started.payload["attempts"] == 1
    assert started.payload["started_at"] is not None
    assert progress and all(r.payload["status"] == "running" for r in progress)
    assert all(r.payload["progress"]["stage"] for r in progress)
    # Each snapshot is of its moment: the started and progress ones were taken before the end.
    assert all(r.payload["finished_at"] is None for r in (started, *progress))
    assert completed.payload["result"] is not None
    # Alice's deliveries are signed with her own secret, not the deployment's.
    with pytest.raises(WebhookVerificationError):
        Webhook(service.webhook_secret("bob")).verify(completed.body, completed.headers)


REFUSED = [
    pytest.param(gateway, url, why, id=f"{gateway}-{name}")
    for gateway in ("main", "strict")
    for name, url, why in [
        ("metadata", "http://169.254.169.254/latest/meta-data/", "link-local"),
        ("private", "http://10.0.0.1/hook", "private"),
        ("ftp", "ftp://127.0.0.1/hook", "http"),
        ("file", "file:///etc/passwd", "http"),
    ]
] + [
    # Admitted on the main gateway (its allowlist has 127.0.0.1), refused without the allowlist.
    pytest.param("strict", "http://127.0.0.1:{port}/hook", "loopback", id="strict-loopback"),
    pytest.param("strict", "http://localhost:{port}/hook", "loopback", id="strict-localhost"),
]


@pytest.mark.parametrize(("gateway", "url", "why"), REFUSED)
def test_non_public_webhook_destinations_are_refused(
    service: Service, strict_gateway: str, receiver: WebhookReceiver, gateway: str, url: str, why: str
) -> None:
    client = service.client("alice", base_url=strict_gateway if gateway == "strict" else None)
    url = url.format(port=receiver.port)
    before = StoreSnapshot.take(service.redis)

    response = submit_json(client, [], {"instruction": "A cat", "steps": 2, "webhook_url": url})

    error = assert_error(response, 422, "webhook_url_refused")
    assert why in error["message"] and error["details"]["webhook_url"] == url
    before.assert_unchanged(service.redis)


def test_webhooks_need_a_signing_secret(service: Service, strict_gateway: str) -> None:
    bob = service.client("bob", base_url=strict_gateway)  # no secret of his own, and no deployment one
    before = StoreSnapshot.take(service.redis)

    response = submit_json(
        bob, [], {"instruction": "A cat", "steps": 2, "webhook_url": "https://93.184.216.34/hook"}
    )

    assert_error(response, 422, "webhooks_unavailable")
    before.assert_unchanged(service.redis)


def test_webhook_events_need_a_webhook_url(service: Service, alice: httpx.Client) -> None:
    before = StoreSnapshot.take(service.redis)

    response = submit_json(alice, [], {"instruction": "A cat", "webhook_events": ["started"]})

    assert_error(response, 422, "invalid_request")
    before.assert_unchanged(service.redis)


# Server-sent events --------------------------------------------------------------------------------------
def test_event_stream_resumes_after_a_reconnect_to_another_gateway(
    service: Service, alice: httpx.Client, strict_gateway: str
) -> None:
    steps = 800  # about two seconds of denoising
    job = submit(alice, {"steps": steps})

    def denoising(event: ServerSentEvent) -> bool:
        return event.event == "progress" and event.json()["stage"] == "denoise"

    first, ended = read_events(alice, job["id"], stop=denoising)
    assert not ended
    assert get_job(alice, job["id"])["status"] == "running"  # hung up mid-denoise
    # The reconnect lands on another replica, which reads the same Redis stream.
    replica = service.client("alice", base_url=strict_gateway)
    rest, ended = read_events(replica, job["id"], last_event_id=first[-1].id)

    assert ended
    events = first + rest
    keys = [event_id_key(event.id or "") for event in events]
    assert keys == sorted(set(keys)), "ids repeat or go back across the reconnect"
    stored = [entry.decode() for entry, _ in service.redis.xrange(service.store.keys.events(job["id"]))]
    assert [event.id for event in events] == stored, "events were lost across the reconnect"
    types = [event.event for event in events]
    assert types[:2] == ["queued", "started"]
    assert set(types[2:-1]) == {"progress"}
    assert types[-1] == "succeeded"
    queued = events[0].json()
    assert set(queued) <= {"position"} and queued.get("position", 1) >= 1
    denoise = [event.json()["step"] for event in events if denoising(event)]
    assert denoise == list(range(1, steps + 1))
    final = events[-1].json()
    assert final["status"] == "succeeded" and final["result"] is not None
    assert final == get_job(alice, job["id"])


def test_event_stream_of_a_finished_job_ends_with_its_final_event(
    service: Service, alice: httpx.Client
) -> None:
    job = submit(alice, {"steps": 2}, headers={"Prefer": "wait=30"})
    assert job["status"] == "succeeded"

    everything, ended = read_events(alice, job["id"])
    assert ended
    assert [event.event for event in everything][:2] == ["queued", "started"]
    assert [event.event in TERMINAL for event in everything].count(True) == 1
    final = everything[-1]
    assert final.event == "succeeded" and final.json() == get_job(alice, job["id"])

    # Reconnecting with the final id: 204, the standard end (a browser's EventSource stops there).
    again = alice.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": final.id})
    assert again.status_code == 204 and again.content == b""

    # Reconnecting from the middle: the rest, exactly.
    rest, ended = read_events(alice, job["id"], last_event_id=everything[2].id)
    assert ended and rest == everything[3:]

    # An id the stream never sent is refused before the stream starts.
    response = alice.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "not-an-id"})
    assert_error(response, 422, "invalid_request")


def test_event_stream_is_404_for_another_keys_job_or_an_unknown_id(
    service: Service, alice: httpx.Client, bob: httpx.Client
) -> None:
    job = submit(alice, {"steps": 2}, headers={"Prefer": "wait=30"})

    assert_error(bob.get(f"/v1/jobs/{job['id']}/events"), 404, "job_not_found")
    assert_error(alice.get(f"/v1/jobs/{UNKNOWN_JOB}/events"), 404, "job_not_found")
    assert_error(alice.get("/v1/jobs/not-a-job/events"), 404, "job_not_found")


def test_a_quiet_job_keeps_its_event_stream_and_prefer_wait_open(tiny_cache: Path, tmp_path: Path) -> None:
    """Nothing happens to a job for longer than redis-py's 5 s socket timeout (here no worker runs at
    all): its event stream stays open and `Prefer: wait` waits the whole time, neither fails."""
    with (
        LocalStack(tmp_path, workers=0, env=stack_env(tiny_cache)) as stack,
        httpx.Client(base_url=stack.url, timeout=30) as client,
        httpx.Client(base_url=stack.url, timeout=30) as listener,
        ThreadPoolExecutor(1) as pool,
    ):
        quiet = submit(client, {"steps": 2})
        stream = pool.submit(read_events, listener, quiet["id"])

        started = time.monotonic()
        waited = submit_json(client, [], {"instruction": "A cat", "steps": 2}, headers={"Prefer": "wait=6"})
        elapsed = time.monotonic() - started

        assert waited.status_code == 202, waited.text
        # Held its full wait, then answered (the bound is loose: a busy machine may be slow to answer).
        assert waited.json()["status"] == "queued" and 6 <= elapsed < 30
        assert not stream.done(), stream.exception() if stream.done() else None
        assert client.post(f"/v1/jobs/{quiet['id']}/cancel").status_code == 200
        events, ended = stream.result(timeout=10)
        assert ended and [event.event for event in events] == ["queued", "canceled"]
        assert events[0].json() == {"position": 1}
        assert events[-1].json() == get_job(client, quiet["id"])
        gateway = next(process for process in stack.processes if process.name == "gateway")
        assert "Traceback" not in gateway.log_tail(500)


# Cancel --------------------------------------------------------------------------------------------------
def test_cancel_of_a_queued_job_ends_it_unrun(
    service: Service, alice: httpx.Client, long_job: Callable[[], dict[str, Any]]
) -> None:
    running = long_job()
    queued = submit(alice, {"steps": 2})
    behind = submit(alice, {"steps": 2})  # its end proves the worker has seen the canceled job's message
    assert queued["status"] == "queued"

    response = alice.post(f"/v1/jobs/{queued['id']}/cancel")

    assert response.status_code == 200, response.text
    canceled = response.json()
    assert canceled["status"] == "canceled" and canceled["cancel_reason"] == "requested"
    assert canceled["attempts"] == 0 and canceled["started_at"] is None and canceled["finished_at"]
    assert canceled["queue_position"] is None and canceled["error"]["code"] == "canceled"
    assert canceled["cancel_requested"] is False  # that flag is for a running job
    assert get_job(alice, queued["id"]) == canceled
    assert get_job(alice, behind["id"])["queue_position"] == 1
    error = assert_error(alice.post(f"/v1/jobs/{queued['id']}/cancel"), 409, "job_finished")
    assert error["details"] == {"status": "canceled"}

    alice.post(f"/v1/jobs/{running['id']}/cancel")
    assert wait_for_status(alice, behind["id"], watch=service.core)["status"] == "succeeded"
    after = get_job(alice, queued["id"])
    assert after["status"] == "canceled" and after["attempts"] == 0 and after["started_at"] is None


def test_cancel_of_a_running_job_stops_it_and_the_next_job_starts(
    service: Service, alice: httpx.Client, bob: httpx.Client, long_job: Callable[[], dict[str, Any]]
) -> None:
    running = long_job()
    behind = submit(alice, {"steps": 2})

    assert_error(bob.post(f"/v1/jobs/{running['id']}/cancel"), 404, "job_not_found")
    assert_error(alice.post(f"/v1/jobs/{UNKNOWN_JOB}/cancel"), 404, "job_not_found")
    assert get_job(alice, running["id"])["cancel_requested"] is False  # bob's try changed nothing
    response = alice.post(f"/v1/jobs/{running['id']}/cancel")

    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "running" and accepted["cancel_requested"] is True
    assert accepted["cancel_reason"] == "requested"
    canceled = wait_for_status(alice, running["id"], watch=service.core)
    assert canceled["status"] == "canceled" and canceled["cancel_reason"] == "requested"
    assert canceled["error"]["code"] == "canceled" and canceled["attempts"] == 1
    progress = canceled["progress"]
    assert progress["stage"] == "denoise"
    assert running["progress"]["step"] <= progress["step"] < progress["total"] == MAX_STEPS
    following = wait_for_status(alice, behind["id"], watch=service.core)
    assert following["status"] == "succeeded"
    gap = parse_time(following["started_at"]) - parse_time(canceled["finished_at"])
    # The worker takes the next job as soon as the canceled one ends, not after a lease or a timeout
    # (those are 30 s and more; the bound leaves room for a busy machine).
    assert 0 <= gap.total_seconds() < 10
    error = assert_error(alice.post(f"/v1/jobs/{running['id']}/cancel"), 409, "job_finished")
    assert error["details"] == {"status": "canceled"}
    error = assert_error(alice.post(f"/v1/jobs/{behind['id']}/cancel"), 409, "job_finished")
    assert error["details"] == {"status": "succeeded"}


# Idempotency ---------------------------------------------------------------------------------------------
def test_idempotent_replays_return_the_same_job(
    service: Service, alice: httpx.Client, bob: httpx.Client
) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    image = example_images(1)
    fields = {"instruction": "Make it blue", "steps": 2, "seed": 7}
    first = submit_json(alice, image, fields, headers={**key, "Prefer": "wait=30"})
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    job = first.json()
    assert job["status"] == "succeeded"
    before = StoreSnapshot.take(service.redis)

    # The same request again, as JSON or as the same content in a multipart form.
    for replay in (
        submit_json(alice, image, fields, headers=key),
        submit_multipart(alice, image, fields, key),
    ):
        assert replay.status_code == 202, replay.text
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.headers["location"] == job["links"]["self"]
        assert replay.json()["id"] == job["id"] and replay.json()["status"] == "succeeded"
    # The same key for a different request: other options, another image, another deadline.
    for changed in (
        submit_json(alice, image, {**fields, "steps": 3}, headers=key),
        submit_json(alice, example_images(2)[1:], fields, headers=key),
        submit_json(alice, image, fields, headers={**key, "Cancel-After": "60"}),
    ):
        assert_error(changed, 422, "idempotency_key_reused")
    before.assert_unchanged(service.redis)

    # Keys are per API key: bob's same key is his own new job.
    bobs = submit_json(bob, image, fields, headers={**key, "Prefer": "wait=30"})
    assert bobs.status_code == 200, bobs.text
    assert "idempotent-replayed" not in bobs.headers
    assert bobs.json()["id"] != job["id"] and bobs.json()["status"] == "succeeded"
    bob_replay = submit_json(bob, image, fields, headers=key)
    assert bob_replay.headers["idempotent-replayed"] == "true"
    assert bob_replay.json()["id"] == bobs.json()["id"]


# Deadlines -----------------------------------------------------------------------------------------------
def test_expired_deadlines_cancel_queued_jobs_unrun(
    service: Service,
    alice: httpx.Client,
    receiver: WebhookReceiver,
    long_job: Callable[[], dict[str, Any]],
) -> None:
    url = receiver.endpoint(service.webhook_secret("alice"))
    running = long_job()
    by_body = submit(alice, {"steps": 2, "deadline_s": 1, "webhook_url": url})
    by_header = submit(alice, {"steps": 2}, headers={"Cancel-After": "1"})
    generous = submit(alice, {"steps": 2, "deadline_s": 600})
    for job in (by_body, by_header):
        assert job["status"] == "queued"
        lead = parse_time(job["deadline_at"]) - parse_time(job["created_at"])
        assert abs(lead.total_seconds() - 1) < 0.01

    expired = [
        wait_for_status(alice, job["id"], timeout=15, watch=service.core) for job in (by_body, by_header)
    ]

    for job in expired:
        assert job["status"] == "canceled" and job["cancel_reason"] == "deadline", job
        assert job["attempts"] == 0 and job["started_at"] is None and job["error"]["code"] == "deadline"
        late = parse_time(job["finished_at"]) - parse_time(job["deadline_at"])
        assert 0 <= late.total_seconds() < 3  # the gateways sweep deadlines every second
    assert get_job(alice, generous["id"])["status"] == "queued"
    # The job with a generous deadline runs normally once the worker is free.
    alice.post(f"/v1/jobs/{running['id']}/cancel")
    done = wait_for_status(alice, generous["id"], watch=service.core)
    assert done["status"] == "succeeded" and done["attempts"] == 1 and done["cancel_reason"] is None
    # The worker took the expired jobs' messages before that one's, and ran neither.
    for job in expired:
        after = get_job(alice, job["id"])
        assert after["attempts"] == 0 and after["started_at"] is None

    # With a webhook, the deadline's cancel is delivered as `completed`.
    [delivery] = receiver.wait_for(url, lambda got: len(got) >= 1, what="the canceled job's webhook")
    assert delivery.verified and delivery.answered == 204
    assert delivery.payload["id"] == by_body["id"] and delivery.payload["status"] == "canceled"
    assert delivery.payload["cancel_reason"] == "deadline" and delivery.payload["attempts"] == 0
    recorded = wait_for_job(
        alice,
        by_body["id"],
        lambda job: (job["webhook"]["last_delivery"] or {}).get("status") == "delivered",
        what="the delivery to be recorded",
    )
    assert recorded["webhook"]["last_delivery"]["event"] == "completed"
    # Its event stream ends with `canceled`, whose data is the job object.
    events, ended = read_events(alice, by_body["id"])
    assert ended and [event.event for event in events] == ["queued", "canceled"]
    assert events[-1].json() == recorded


def test_a_deadline_due_after_the_job_ended_sends_no_second_webhook(
    service: Service, alice: httpx.Client, receiver: WebhookReceiver
) -> None:
    url = receiver.endpoint(service.webhook_secret("alice"))
    job = submit(alice, {"steps": MAX_STEPS, "deadline_s": 1.5, "webhook_url": url})
    wait_for_job(alice, job["id"], is_denoising, what="the job to denoise", watch=service.core)
    assert alice.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    canceled = wait_for_status(alice, job["id"], watch=service.core)
    assert canceled["status"] == "canceled" and canceled["cancel_reason"] == "requested"
    [delivery] = receiver.wait_for(url, lambda got: len(got) >= 1, what="the canceled job's webhook")
    assert delivery.payload["status"] == "canceled"

    # Once the deadline is due, a sweep finds the job ended and drops it from the deadlines...
    wait_until(
        lambda: True if service.redis.zscore("do2:deadlines", job["id"]) is None else None,
        timeout=10,
        what="the deadline sweep",
        watch=service.core,
    )
    # ... without canceling it again: no second `completed` delivery is made.
    watch_until = time.monotonic() + 0.5
    while time.monotonic() < watch_until:
        assert len(receiver.received(url)) == 1
        last = get_job(alice, job["id"])["webhook"]["last_delivery"]
        assert last["id"] == delivery.webhook_id, last
        time.sleep(0.05)
    assert get_job(alice, job["id"])["cancel_reason"] == "requested"


@pytest.mark.parametrize("value", ["abc", "-1", "0", "", "nan", "inf", "1e300", "86401"])
def test_invalid_cancel_after_is_refused(service: Service, alice: httpx.Client, value: str) -> None:
    before = StoreSnapshot.take(service.redis)

    response = submit_json(alice, [], {"instruction": "A cat", "steps": 2}, headers={"Cancel-After": value})

    assert_error(response, 422, "invalid_request")
    before.assert_unchanged(service.redis)


@pytest.mark.parametrize("value", ["inf", "1e300", "86401"])
def test_deadline_beyond_the_jobs_lifetime_is_refused(
    service: Service, alice: httpx.Client, value: str
) -> None:
    before = StoreSnapshot.take(service.redis)

    response = submit_multipart(alice, [], {"instruction": "A cat", "steps": 2, "deadline_s": value})

    assert_error(response, 422, "invalid_request")
    before.assert_unchanged(service.redis)


def test_receiver_refuses_unsigned_deliveries(receiver: WebhookReceiver) -> None:
    url = receiver.endpoint(new_webhook_secret())

    response = httpx.post(url, content=b"{}", headers={"content-type": "application/json"}, timeout=5)

    assert response.status_code == 401
    [received] = wait_until(lambda: receiver.received(url) or None, timeout=5, what="the receiver's record")
    assert not received.verified


# Feature Mixing ---------------------------------------------------------------------------------------
def test_a_feature_mixing_job_runs_reports_progress_and_webhooks_its_two_results(
    service: Service, bob: httpx.Client, receiver: WebhookReceiver
) -> None:
    url = receiver.endpoint(service.webhook_secret("bob"))
    fields = {
        "source_prompt": "a woven straw hat on a wooden table",
        "target_prompt": "a teapot",
        "attribute": "material",
        "seed": 11,
        "steps": 3,
        "webhook_url": url,
        "webhook_events": ["started", "completed"],
    }
    created = submit_json(bob, [], fields)
    assert created.status_code == 202, created.text
    with bob.stream("GET", f"/v1/jobs/{created.json()['id']}/events") as stream:
        events = list(sse_events(stream))
    steps = [e.json()["step"] for e in events if e.event == "progress" and e.json()["stage"] == "denoise"]
    assert steps and max(steps) == 3 and events[-1].event == "succeeded"
    job = bob.get(f"/v1/jobs/{created.json()['id']}").json()
    assert (job["task"], job["seed"], job["attribute"]) == ("feature_mixing", 11, "material")
    assert job["mixing"]["mixed_steps"] == 3 and job["result"] == job["results"][0]
    urls = [result["url"] for result in job["results"]]
    assert urls == [f"/v1/jobs/{job['id']}/result", f"/v1/jobs/{job['id']}/result?index=1"]
    source, target = (bob.get(u) for u in urls)
    assert source.status_code == target.status_code == 200
    assert bob.get(f"/v1/jobs/{job['id']}/result?index=0").content == source.content
    assert source.content != target.content
    assert Image.open(io.BytesIO(target.content)).size == (
        job["results"][1]["width"],
        job["results"][1]["height"],
    )
    for index in (-1, 16):  # no job has more than MAX_RESULTS
        assert bob.get(f"/v1/jobs/{job['id']}/result?index={index}").status_code == 422
    single = submit_json(bob, [], {"instruction": "a cup", "steps": 1}, headers={"Prefer": "wait=30"}).json()
    missing = bob.get(f"/v1/jobs/{single['id']}/result?index=1")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "result_index"
    hooks = receiver.wait_for(
        url, lambda got: len(got) >= 2, what="started and completed", watch=service.core
    )
    completed = [h.payload for h in hooks if h.payload["status"] == "succeeded"]
    assert completed and len(completed[0]["results"]) == 2


def test_a_running_feature_mixing_job_can_be_canceled(service: Service, bob: httpx.Client) -> None:
    fields = {"source_prompt": "a red coat", "target_prompt": "a cat", "steps": LONG_STEPS}
    job_id = submit_json(bob, [], fields).json()["id"]
    wait_for_job(
        bob, job_id, lambda job: job["status"] == "running", what="the pair to run", watch=service.core
    )
    assert bob.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    done = wait_for_status(bob, job_id, watch=service.core)
    assert done["status"] == "canceled" and done["results"] is None

"""The Python client (`dreamomni2.Client`, `AsyncClient`) against the real stack: submit from paths,
bytes and PIL images, follow the event stream (across a cut connection), download, cancel,
idempotent replays, the typed errors, and webhook signature checks."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.stack import LocalStack, free_port
from dreamomni2 import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    InvalidInputError,
    Job,
    JobCanceledError,
    JobFailedError,
    JobProgress,
    JobStatus,
    NotFoundError,
    ServiceUnavailableError,
    Task,
    WaitTimeoutError,
    WebhookVerificationError,
    verify_webhook,
)
from workers.config import WorkerSettings

from .conftest import Service
from .support import LONG_STEPS, WebhookReceiver, event_id_key, example_images, png_bytes, stack_env

UNKNOWN_JOB = "j_" + "0" * 32


@pytest.fixture
def client(service: Service) -> Iterator[Client]:
    with Client(service.stack.url, api_key=service.keys["alice"]) as running:
        yield running


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def denoise_steps(updates: list[JobProgress]) -> list[int]:
    return [u.step for u in updates if u.status is JobStatus.RUNNING and u.stage == "denoise"]


def wait_until_denoising(client: Client, job: Job) -> None:
    """Follow the job's stream until it has done a few denoising steps (then hang up)."""
    for event in client.events(job, timeout=60):
        if event.type == "progress" and event.data["stage"] == "denoise" and event.data["step"] >= 5:
            return
        assert not event.final, f"the long job ended early: {event.data}"


# Submitting, waiting, downloading ---------------------------------------------------------------------------
def test_submit_from_path_bytes_and_pil_then_wait_and_download(
    service: Service, client: Client, tmp_path: Path
) -> None:
    first, second, third = example_images(3)
    path = tmp_path / "bag.png"
    path.write_bytes(first)
    pil = decode(third).convert("RGB")
    updates: list[JobProgress] = []

    job = client.submit(
        "make the bag in image 1 use the pattern of image 2, the colours of image 3",
        [path, second, pil],
        steps=4,
        seed=7,
        guidance=2.5,
        translate=False,
        step_cache="none",
    )
    # Queued, or already running: the answer shows the job as it is, and the idle worker may have
    # claimed it before the answer was rendered (a busy machine can pause the gateway in between).
    assert job.status in (JobStatus.QUEUED, JobStatus.RUNNING), job
    assert job.image_count == 3 and job.task.value == "edit"
    assert (job.steps, job.seed, job.guidance) == (4, 7, 2.5)
    # What arrived is what was given: the file's bytes, the bytes, and the PIL image's pixels.
    stored = service.store.images(job.id)
    assert stored[:2] == [first, second]
    assert decode(stored[2]).convert("RGB").tobytes() == pil.tobytes()

    done = client.wait(job, on_progress=updates.append, timeout=60)

    assert done.status is JobStatus.SUCCEEDED and done.id == job.id and done.adapter.value == "edit"
    assert updates[0].status is JobStatus.QUEUED and updates[0].event is not None
    assert updates[1].status is JobStatus.RUNNING and updates[1].stage is None  # started
    assert denoise_steps(updates) == [1, 2, 3, 4]
    last_step = [u for u in updates if u.stage == "denoise"][-1]
    assert (last_step.step, last_step.total, last_step.fraction) == (4, 4, 1.0)
    assert updates[-1].status is JobStatus.SUCCEEDED and updates[-1].job == done
    assert done == client.get(job.id)

    data = client.result_bytes(done)
    image = client.result_image(job.id)
    saved = client.download(done, tmp_path / "out.png")
    assert data.startswith(b"\x89PNG") and saved.read_bytes() == data
    assert image.format == "PNG" and image.size == (done.result.width, done.result.height)
    assert len(data) == done.result.bytes

    # The event iterator: the whole stream in order, and from the middle exactly the rest.
    events = list(client.events(job))
    assert [e.type for e in events][:2] == ["queued", "started"] and events[-1].type == "succeeded"
    assert events[-1].job == done
    keys = [event_id_key(e.id or "") for e in events]
    assert keys == sorted(set(keys))
    assert list(client.events(job, last_event_id=events[2].id)) == events[3:]
    assert list(client.events(job, last_event_id=events[-1].id)) == []  # over: the service answers 204


def test_generation_options_and_the_async_client(service: Service, tmp_path: Path) -> None:
    async def scenario() -> None:
        updates: list[JobProgress] = []

        async def record(update: JobProgress) -> None:
            updates.append(update)

        async with AsyncClient(service.stack.url, api_key=service.keys["alice"]) as client:
            job = await client.submit(
                "a lighthouse at dusk", task="generate", steps=3, size=(128, 64), output_format="webp"
            )
            assert job.task.value == "generate" and job.output_format.value == "webp"
            done = await client.wait(job.id, on_progress=record, timeout=60)
            assert done.status is JobStatus.SUCCEEDED and denoise_steps(updates) == [1, 2, 3]
            image = await client.result_image(done)
            assert image.format == "WEBP" and image.width > image.height  # the 2:1 aspect asked for
            saved = await client.download(done, tmp_path / "out.webp")
            assert saved.read_bytes() == await client.result_bytes(done)
            events = [event async for event in client.events(done)]
            assert events[-1].type == "succeeded" and events[-1].job == done
            assert await client.get(done) == done
            with pytest.raises(ConflictError) as finished:
                await client.cancel(done)
            assert finished.value.code == "job_finished" and finished.value.status == 409
            with pytest.raises(NotFoundError) as missing:
                await client.get(UNKNOWN_JOB)
            assert missing.value.code == "job_not_found"

    asyncio.run(scenario())


def test_feature_mix_downloads_both_images_and_refusals_carry_the_code(
    service: Service, client: Client, tmp_path: Path
) -> None:
    job = client.feature_mix(
        "a woven straw hat on a wooden table",
        "a teapot",
        attribute="material",
        seed=5,
        steps=1,
        mix_steps=0.5,
    )
    assert (job.task, job.instruction, job.image_count) == (Task.FEATURE_MIXING, None, 0)
    assert (job.source_prompt, job.target_prompt, job.attribute) == (
        "a woven straw hat on a wooden table", "a teapot", "material"
    )  # fmt: skip
    done = client.wait(job, timeout=60)
    assert done.status is JobStatus.SUCCEEDED and done.seed == 5
    assert done.mixing is not None and done.mixing["step_fraction"] == 0.5
    assert done.results is not None and len(done.results) == 2 and done.result == done.results[0]

    source, target = client.result_bytes(done), client.result_bytes(done.id, index=1)
    assert source != target and source == client.result_bytes(done, index=0)
    assert client.download(done, tmp_path / "target.png", index=1).read_bytes() == target
    image = client.result_image(done, index=1)
    assert image.size == (done.results[1].width, done.results[1].height)
    with pytest.raises(ValueError, match="index"):
        client.result_bytes(done, index=16)

    for kwargs, code in (
        ({"source_prompt": " ", "target_prompt": "a teapot"}, "mixing_needs_prompts"),
        ({"source_prompt": "a hat", "target_prompt": "a teapot", "mix_steps": 1.5}, "invalid_mix_steps"),
        (
            {"source_prompt": "a hat", "target_prompt": "a teapot", "mix_strength": -0.1},
            "invalid_mix_strength",
        ),
    ):
        with pytest.raises(InvalidInputError) as refused:
            client.feature_mix(**kwargs)
        assert refused.value.code == code and refused.value.status == 422, kwargs
    with pytest.raises(InvalidInputError) as local:
        client.feature_mix("a hat", "a teapot", mix_blocks="some")
    assert local.value.code == "invalid_request" and "mix_blocks" in local.value.message


# A cut event stream -----------------------------------------------------------------------------------------
class CuttingProxy:
    """A TCP proxy to the gateway that cuts the first event-stream connection mid-event, once the
    response has carried `cut_after` progress events: the client sees the connection drop there."""

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        # Every client->gateway chunk (to read the request headers), and whether the cut came before.
        self.requests: list[tuple[bool, bytes]] = []
        self.delivered = b""  # what the cut connection's stream passed on, partial event included
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            streaming = threading.Event()
            threading.Thread(
                target=self._requests, args=(downstream, upstream, streaming), daemon=True
            ).start()
            threading.Thread(
                target=self._answers, args=(upstream, downstream, streaming), daemon=True
            ).start()

    def _requests(
        self, downstream: socket.socket, upstream: socket.socket, streaming: threading.Event
    ) -> None:
        while data := self._recv(downstream):
            with self._lock:
                self.requests.append((self.cut.is_set(), data))
            if b"/events" in data and not self.cut.is_set():
                streaming.set()  # before forwarding: every answer byte after this is the stream's
            upstream.sendall(data)
        upstream.close()

    def _answers(
        self, upstream: socket.socket, downstream: socket.socket, streaming: threading.Event
    ) -> None:
        seen = b""
        while data := self._recv(upstream):
            if streaming.is_set() and not self.cut.is_set():
                seen += data
                if seen.count(b"event: progress") >= self.cut_after:
                    mark = -1
                    for _ in range(self.cut_after):
                        mark = seen.index(b"event: progress", mark + 1)
                    # Forward up to the middle of that event's type line, then hang up on both sides.
                    keep = max(0, len(data) - (len(seen) - (mark + 9)))
                    downstream.sendall(data[:keep])
                    self.delivered = seen[: mark + 9]
                    self.cut.set()
                    for sock in (downstream, upstream):
                        with contextlib.suppress(OSError):  # the other pump may have closed it
                            sock.shutdown(socket.SHUT_RDWR)
                    return
            downstream.sendall(data)
        downstream.close()

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""


def test_num_images_gives_each_image_by_index_with_its_seed(service: Service, client: Client) -> None:
    every = WorkerSettings.model_fields["preview_every"].default
    job = client.submit("a paper boat", task="generate", steps=every, seed=20, num_images=2, translate=False)
    assert job.num_images == 2
    updates: list[JobProgress] = []
    done = client.wait(job, on_progress=updates.append, timeout=60)
    assert done.results is not None and [result.seed for result in done.results] == [20, 21]
    # The live previews reach the client: one per image here (every Nth of the job's 2 x N steps).
    previews = [(u.step, u.preview_bytes()) for u in updates if u.preview is not None]
    assert [step for step, _ in previews] == [every, 2 * every]
    assert all(Image.open(io.BytesIO(jpeg)).format == "JPEG" for _, jpeg in previews)
    assert all(u.preview_bytes() is None for u in updates if u.preview is None)
    first, second = client.result_bytes(done, index=0), client.result_bytes(done, index=1)
    assert first != second
    with pytest.raises(InvalidInputError) as refused:
        client.submit("a paper boat", num_images=0)
    assert refused.value.code == "invalid_num_images"


def test_wait_resumes_with_last_event_id_after_the_stream_is_cut(service: Service) -> None:
    steps = 60  # the cut comes after 20 progress events, mid-denoise
    proxy = CuttingProxy(service.stack.port, cut_after=20)
    updates: list[JobProgress] = []
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", api_key=service.keys["alice"]) as client:
            job = client.submit("a wide beach", steps=steps)
            done = client.wait(job, on_progress=updates.append, timeout=60)
    finally:
        proxy.close()

    assert proxy.cut.is_set(), "the proxy never cut the stream"
    assert done.status is JobStatus.SUCCEEDED
    # Every step once, in order, across the cut: the partial event was dropped, the rest resumed.
    assert denoise_steps(updates) == list(range(1, steps + 1))
    event_ids = [u.event.id for u in updates if u.event is not None]
    stored = [entry.decode() for entry, _ in service.redis.xrange(service.store.keys.events(job.id))]
    assert event_ids == stored
    # The reconnect asked for the events after the last whole one the cut connection carried, not
    # after the partial one it was cut in.
    ids = re.findall(rb"id: (\d+-\d+)\r\n", proxy.delivered)
    whole = re.findall(rb"id: (\d+-\d+)\r\n", proxy.delivered[: proxy.delivered.rindex(b"\r\n\r\n")])
    assert len(ids) == len(whole) + 1, "the cut is not inside an event"
    streams = [data.lower() for _, data in proxy.requests if b"/events" in data]
    assert b"last-event-id" not in streams[0]
    [reconnect, *_] = [data.lower() for after, data in proxy.requests if after and b"/events" in data]
    assert b"last-event-id: " + whole[-1] + b"\r\n" in reconnect


# Cancel, idempotency --------------------------------------------------------------------------------------
def test_cancel_a_running_job(service: Service, client: Client) -> None:
    job = client.submit("Keep the worker busy", steps=LONG_STEPS)
    wait_until_denoising(client, job)
    with pytest.raises(ConflictError) as unfinished:
        client.result_bytes(job)
    assert unfinished.value.code == "job_not_finished" and unfinished.value.status == 409
    with pytest.raises(WaitTimeoutError) as waited:
        client.wait(job, timeout=0.3)
    assert waited.value.code == "wait_timeout" and waited.value.job_id == job.id

    accepted = client.cancel(job)

    assert accepted.status is JobStatus.RUNNING and accepted.cancel_requested
    with pytest.raises(JobCanceledError) as canceled:
        client.wait(job, timeout=60)
    assert canceled.value.code == "canceled" and canceled.value.status is None
    assert canceled.value.job.status is JobStatus.CANCELED and canceled.value.job.cancel_reason == "requested"
    assert canceled.value.job.progress.step < LONG_STEPS
    with pytest.raises(JobCanceledError) as no_result:
        client.result_bytes(job)
    assert no_result.value.code == "canceled" and no_result.value.status == 409
    with pytest.raises(ConflictError) as again:
        client.cancel(job)
    assert again.value.code == "job_finished" and again.value.details == {"status": "canceled"}


def test_idempotency_keys(service: Service, client: Client) -> None:
    image = png_bytes(64, 48)
    first = client.submit("make it blue", [image], steps=2, idempotency_key="order-7731")
    replay = client.submit("make it blue", [image], steps=2, idempotency_key="order-7731")
    assert replay.id == first.id

    with pytest.raises(InvalidInputError) as reused:
        client.submit("make it green", [image], steps=2, idempotency_key="order-7731")
    assert reused.value.code == "idempotency_key_reused" and reused.value.status == 422
    # Without a key of the caller's, each submission is a job of its own (the client's keys are fresh).
    other = client.submit("make it blue", [image], steps=2)
    assert other.id != first.id
    for job in (first, other):
        assert client.wait(job, timeout=60).status is JobStatus.SUCCEEDED


# Typed errors ---------------------------------------------------------------------------------------------
def test_refusals_raise_invalid_input_with_the_service_code(service: Service, client: Client) -> None:
    before = service.store.queue_depth()
    with pytest.raises(InvalidInputError) as steps:
        client.submit("a red bag", steps=0)
    assert steps.value.code == "invalid_steps" and steps.value.status == 422
    assert steps.value.details["field"] == "steps" and "steps" in steps.value.message
    with pytest.raises(InvalidInputError) as no_image:
        client.submit("make it red", task="edit")
    assert no_image.value.code == "edit_needs_image"
    with pytest.raises(InvalidInputError) as corrupt:
        client.submit("make it red", [b"not an image"])
    assert corrupt.value.code == "invalid_image" and corrupt.value.status == 422
    with pytest.raises(InvalidInputError) as too_many:
        client.submit("make it red", example_images(6))
    assert too_many.value.code == "too_many_images" and too_many.value.details == {"images": 6, "max": 5}
    # A choice the API does not have is refused before anything is sent.
    with pytest.raises(InvalidInputError) as local:
        client.submit("a red bag", output_format="gif")
    assert local.value.code == "invalid_request" and local.value.status is None
    assert "output_format" in local.value.message
    assert service.store.queue_depth() == before


def test_authentication_and_not_found_errors(service: Service, client: Client) -> None:
    with (
        Client(service.stack.url, api_key="not-a-key") as stranger,
        pytest.raises(AuthenticationError) as bad,
    ):
        stranger.get(UNKNOWN_JOB)
    assert bad.value.code == "invalid_api_key" and bad.value.status == 401
    with Client(service.stack.url, api_key="") as anonymous, pytest.raises(AuthenticationError) as none:
        anonymous.submit("a red bag")
    assert none.value.code == "missing_api_key"

    with pytest.raises(NotFoundError) as unknown:
        client.get(UNKNOWN_JOB)
    assert unknown.value.code == "job_not_found" and unknown.value.status == 404
    with pytest.raises(NotFoundError) as malformed:
        client.wait("not-a-job")
    assert malformed.value.code == "job_not_found"
    job = client.submit("a red bag", steps=2)
    with Client(service.stack.url, api_key=service.keys["bob"]) as bob:
        for call in (bob.get, bob.cancel, bob.result_bytes, lambda j: list(bob.events(j))):
            with pytest.raises(NotFoundError):
                call(job)
    client.wait(job, timeout=60)


def test_an_unreachable_service(service: Service) -> None:
    with Client(f"http://127.0.0.1:{free_port()}", max_retries=1) as client:
        with pytest.raises(ServiceUnavailableError) as down:
            client.get(UNKNOWN_JOB)
        assert down.value.code == "unreachable" and down.value.status is None
        with pytest.raises(ServiceUnavailableError):
            client.submit("a red bag")
        with pytest.raises(ServiceUnavailableError):
            client.wait(UNKNOWN_JOB, timeout=30)


def test_a_service_without_its_store_is_unavailable(tiny_cache: Path, tmp_path: Path) -> None:
    stack = LocalStack(tmp_path, workers=0, env=stack_env(tiny_cache))  # its Redis is never started
    try:
        stack.start_gateway()
        with Client(stack.url, max_retries=1) as client:
            started = time.monotonic()
            with pytest.raises(ServiceUnavailableError) as down:
                client.get(UNKNOWN_JOB)
            # Tried again once, after the seconds the answer asked for.
            assert time.monotonic() - started >= down.value.retry_after > 0
            assert down.value.code == "unavailable" and down.value.status == 503
        with Client(stack.url, max_retries=0) as impatient, pytest.raises(ServiceUnavailableError) as stream:
            impatient.wait(UNKNOWN_JOB, timeout=30)
        assert stream.value.code == "unavailable" and stream.value.status == 503
    finally:
        stack.stop()


def test_a_job_that_fails_in_the_worker(service: Service, lax_gateway: str) -> None:
    # The second gateway admits an 8x8 image; the worker, with the default smallest side, refuses it.
    with Client(lax_gateway, api_key=service.keys["alice"]) as client:
        job = client.submit("make it red", [png_bytes(8, 8)], steps=2)
        with pytest.raises(JobFailedError) as failed:
            client.wait(job, timeout=60)
        assert failed.value.code == "image_too_small" and failed.value.job.status is JobStatus.FAILED
        assert failed.value.job.id == job.id and "16" in failed.value.message
        with pytest.raises(JobFailedError) as no_result:
            client.result_image(job)
        assert no_result.value.code == "image_too_small" and no_result.value.status == 409


# Webhooks -------------------------------------------------------------------------------------------------
def test_verify_webhook_accepts_the_services_signature_and_refuses_tampering(
    service: Service, client: Client
) -> None:
    secret = service.webhook_secret("alice")
    with WebhookReceiver() as receiver:
        url = receiver.endpoint(secret)
        job = client.submit("a red bag", steps=2, webhook_url=url, webhook_events=["completed"])
        done = client.wait(job, timeout=60)
        [delivery] = receiver.wait_for(url, lambda got: len(got) >= 1, what="the completed webhook")

    verified = verify_webhook(delivery.body, delivery.headers, secret)
    assert verified.id == job.id and verified.status is JobStatus.SUCCEEDED
    assert verified.result == done.result
    # Any header mapping, any case; the body as text too.
    upper = httpx.Headers({name.upper(): value for name, value in delivery.headers.items()})
    assert verify_webhook(delivery.body.decode(), upper, secret) == verified

    tampered = delivery.body.replace(b'"succeeded"', b'"failed"', 1)
    assert tampered != delivery.body
    for body, headers, key in [
        (tampered, delivery.headers, secret),
        (delivery.body, delivery.headers, service.webhook_secret("bob")),
        (delivery.body, {**delivery.headers, "webhook-id": "msg_other"}, secret),
        (delivery.body, {**delivery.headers, "webhook-timestamp": "1000000000"}, secret),
        (delivery.body, {**delivery.headers, "webhook-signature": "v1"}, secret),
        (delivery.body, {k: v for k, v in delivery.headers.items() if k != "webhook-signature"}, secret),
    ]:
        with pytest.raises(WebhookVerificationError) as refused:
            verify_webhook(body, headers, key)
        assert refused.value.code == "invalid_signature"

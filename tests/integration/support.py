"""What the integration tests share: inputs to send, the stack's settings, and polling with deadlines."""

from __future__ import annotations

import abc
import base64
import functools
import http.server
import io
import json
import os
import random
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Self, TypeVar

import httpx
import pytest
import redis
from PIL import Image
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from app.stack import LocalStack, ManagedProcess
from workers.store import Event, JobStore

T = TypeVar("T")

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
TIMING_STAGES = {"translate", "encode", "denoise", "decode", "total"}

#: Steps of a job that takes seconds on the tiny preset (about 3 ms a step on two CPU cores).
LONG_STEPS = 2000
#: Allowed steps on every stack: the default limit (100) is far too short to catch a job mid-way.
MAX_STEPS = 5000
#: First webhook retry delay on the main stack (it doubles): three attempts take about a second.
WEBHOOK_BACKOFF_S = 0.3
#: Short leases, so a dead worker's job is noticed in seconds: a lapsed 3 s lease, found within 1 s.
FAST_LEASES = {
    "DREAMOMNI2_LEASE_TTL_S": "3",
    "DREAMOMNI2_HEARTBEAT_S": "1",
    "DREAMOMNI2_REAPER_INTERVAL_S": "1",
}


def stack_env(cache: Path, **overrides: str) -> dict[str, str]:
    """Settings of every process of a test stack: the prebuilt tiny models and a small token budget."""
    return {
        "DREAMOMNI2_CACHE_DIR": str(cache),
        "DREAMOMNI2_PRESET": "tiny",
        "DREAMOMNI2_DEVICE": "cpu",
        "DREAMOMNI2_TRANSLATOR_MAX_NEW_TOKENS": "8",
        # The random VLM writes every text to its length limit: short prompt pairs keep jobs quick.
        "DREAMOMNI2_MIXING_PROMPT_MAX_CHARS": "16",
        "DREAMOMNI2_MAX_STEPS": str(MAX_STEPS),
        **overrides,
    }


def new_webhook_secret() -> str:
    """A fresh Standard Webhooks secret: `whsec_` and base64 of random bytes."""
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


# Inputs -----------------------------------------------------------------------------------------------
def png_bytes(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 60, 40)) -> bytes:
    """A small solid-colour PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of random pixels: it hardly compresses, so its size is about 3 bytes a pixel."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def example_images(count: int) -> list[bytes]:
    """`count` distinct images of different sizes (image 1 landscape)."""
    sizes = [(96, 64), (64, 64), (48, 80), (80, 80), (64, 96)]
    return [png_bytes(*sizes[n % len(sizes)], color=(40 * n % 256, 90, 255 - 30 * n)) for n in range(count)]


def data_uri(data: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


@functools.cache
def bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit `side` x `side` PNG of zeros: tens of kilobytes that decode to `side`² pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte, then the packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# Submitting ---------------------------------------------------------------------------------------------
def multipart_parts(images: Sequence[bytes], fields: Mapping[str, object]) -> list[tuple[str, Any]]:
    """Form parts for httpx `files=`: always multipart, even with no image (plain fields have no filename)."""
    parts: list[tuple[str, Any]] = [
        ("images", (f"image-{n}.png", data, "image/png")) for n, data in enumerate(images, start=1)
    ]
    parts += [(name, (None, str(value))) for name, value in fields.items()]
    return parts


def submit_multipart(
    client: httpx.Client,
    images: Sequence[bytes],
    fields: Mapping[str, object],
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    return client.post("/v1/jobs", files=multipart_parts(images, fields), headers=headers)


def submit_json(
    client: httpx.Client,
    images: Sequence[bytes],
    fields: Mapping[str, object],
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    body = {"images": [data_uri(data) for data in images], **fields}
    return client.post("/v1/jobs", json=body, headers=headers)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is `status` with the error envelope and `code`; returns the `error` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert set(error) <= {"code", "message", "details", "request_id"}, error
    assert error["request_id"] == response.headers["x-request-id"], error
    return error


# Processes and waiting ------------------------------------------------------------------------------------
def fail_with_logs(message: str, processes: Iterable[ManagedProcess]) -> NoReturn:
    logs = "\n".join(f"--- {p.name} (alive: {p.alive()}) ---\n{p.log_tail(30)}" for p in processes)
    pytest.fail(f"{message}\n{logs}", pytrace=False)


def check_alive(processes: Iterable[ManagedProcess]) -> None:
    """Fail at once, with its log, when a process that should be running has exited."""
    processes = list(processes)
    dead = [p for p in processes if not p.alive()]
    if dead:
        names = ", ".join(f"{p.name} (exit {p.popen.returncode})" for p in dead)
        fail_with_logs(f"{names} exited unexpectedly", dead)


def core_processes(stack: LocalStack) -> list[ManagedProcess]:
    """Redis, the main gateway and the workers: what must stay up for the stack to serve."""
    return [p for p in stack.processes if p.name in ("redis", "gateway") or p.name.startswith("worker")]


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    watch: Iterable[ManagedProcess] = (),
    interval: float = 0.05,
) -> T:
    """Poll `check` until it returns something other than None; fail with the logs after `timeout`."""
    watch = list(watch)
    deadline = time.monotonic() + timeout
    while True:
        check_alive(watch)
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            fail_with_logs(f"timed out after {timeout:.0f}s waiting for {what}", watch)
        time.sleep(interval)


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_job(
    client: httpx.Client,
    job_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    timeout: float = 60,
    what: str = "the job",
    watch: Iterable[ManagedProcess] = (),
) -> dict[str, Any]:
    """Poll `GET /v1/jobs/{id}` until `predicate(job)` holds; returns that job object."""

    def check() -> dict[str, Any] | None:
        job = get_job(client, job_id)
        return job if predicate(job) else None

    return wait_until(check, timeout=timeout, what=f"{what} ({job_id})", watch=watch)


def wait_for_status(
    client: httpx.Client,
    job_id: str,
    statuses: Iterable[str] = TERMINAL,
    *,
    timeout: float = 60,
    watch: Iterable[ManagedProcess] = (),
) -> dict[str, Any]:
    wanted = frozenset(statuses)
    return wait_for_job(
        client,
        job_id,
        lambda job: job["status"] in wanted,
        timeout=timeout,
        what=f"status in {sorted(wanted)}",
        watch=watch,
    )


def is_denoising(job: dict[str, Any], min_step: int = 10) -> bool:
    progress = job["progress"]
    return job["status"] == "running" and progress["stage"] == "denoise" and progress["step"] >= min_step


# Redis ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreSnapshot:
    """What a refused submission must leave unchanged: no id drawn, nothing queued, no job keys."""

    seq: int
    queue_depth: int
    broker_messages: int
    job_keys: frozenset[bytes]

    @classmethod
    def take(cls, client: redis.Redis, prefix: str = "do2", queue: str = "dreamomni2.jobs") -> StoreSnapshot:
        return cls(
            seq=int(client.get(f"{prefix}:seq") or 0),
            queue_depth=int(client.zcard(f"{prefix}:queue")),
            broker_messages=int(client.llen(queue)),
            job_keys=frozenset(client.scan_iter(match=f"{prefix}:job:*", count=1000)),
        )

    def assert_unchanged(self, client: redis.Redis) -> None:
        after = StoreSnapshot.take(client)
        assert after.seq == self.seq, "a job id was drawn"
        assert after.queue_depth == self.queue_depth, "the job queue changed"
        assert after.broker_messages == self.broker_messages, "a message was sent to the workers"
        assert not after.job_keys - self.job_keys, f"job keys appeared: {after.job_keys - self.job_keys}"


# Webhooks ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReceivedWebhook:
    """One POST that reached the receiver, and what the receiver made of it."""

    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    verified: bool
    answered: int
    at: float  # time.monotonic() on arrival

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


class LoopbackServer(abc.ABC):
    """An HTTP server on a loopback port for the stack to call (a customer's webhook endpoint, a trace
    collector, an external service the client calls): each POST is answered by `answer(path, headers,
    body)` -> a status with no body, or (status, JSON body bytes)."""

    def __init__(self, name: str) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                answer = server.answer(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                status, payload = answer if isinstance(answer, tuple) else (answer, b"")
                self.send_response(status)
                if payload:
                    self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    @abc.abstractmethod
    def answer(self, path: str, headers: dict[str, str], body: bytes) -> int | tuple[int, bytes]:
        """The status to answer a POST with (its body read), and the answer's JSON body if any."""

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class WebhookReceiver(LoopbackServer):
    """A customer's endpoint on a loopback port: checks every delivery's Standard Webhooks signature
    with the `standardwebhooks` package (401 when it does not verify) and answers from a script."""

    def __init__(self) -> None:
        super().__init__("receiver")
        self._lock = threading.Lock()
        self._routes: dict[str, tuple[str, list[int]]] = {}
        self._holds: dict[str, float] = {}
        self._received: list[ReceivedWebhook] = []

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        answered = self._receive(path, headers, body)
        time.sleep(self._holds.get(path, 0.0))  # a slow endpoint: the attempt in flight
        return answered

    def endpoint(self, secret: str, answers: Sequence[int] = (), hold_s: float = 0.0) -> str:
        """A fresh URL: deliveries to it must be signed with `secret`; they are answered `answers`
        in turn, then 204, each `hold_s` seconds after it arrived (recorded on arrival)."""
        path = f"/hooks/{uuid.uuid4().hex}"
        with self._lock:
            self._routes[path] = (secret, list(answers))
            self._holds[path] = hold_s
        return f"http://127.0.0.1:{self.port}{path}"

    def _receive(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            route = self._routes.get(path)
            if route is None:
                return 404
            secret, answers = route
            try:
                Webhook(secret).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
            answered = (answers.pop(0) if answers else 204) if verified else 401
            self._received.append(ReceivedWebhook(path, headers, body, verified, answered, time.monotonic()))
            return answered

    def received(self, url: str) -> list[ReceivedWebhook]:
        """The deliveries to `url` so far, in order of arrival."""
        path = httpx.URL(url).path
        with self._lock:
            return [r for r in self._received if r.path == path]

    def wait_for(
        self,
        url: str,
        done: Callable[[list[ReceivedWebhook]], bool],
        *,
        timeout: float = 30,
        what: str = "webhook deliveries",
        watch: Iterable[ManagedProcess] = (),
    ) -> list[ReceivedWebhook]:
        """Poll until `done(deliveries to url)` holds; returns those deliveries."""

        def check() -> list[ReceivedWebhook] | None:
            received = self.received(url)
            return received if done(received) else None

        return wait_until(check, timeout=timeout, what=what, watch=watch)


# Server-sent events --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerSentEvent:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:  # noqa: ANN401 (any JSON value)
        return json.loads(self.data)


def sse_events(response: httpx.Response) -> Iterator[ServerSentEvent]:
    """The events of a `text/event-stream` response as they arrive (comments such as pings skipped)."""
    fields: dict[str, list[str]] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in fields or "event" in fields:
                event_id = fields["id"][-1] if "id" in fields else None
                event = fields.get("event", ["message"])[-1]
                yield ServerSentEvent(event_id, event, "\n".join(fields.get("data", [])))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)


def event_id_key(event_id: str) -> tuple[int, int]:
    """A Redis stream id (`ms-seq`) as a sortable pair."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def all_events(store: JobStore, job_id: str) -> list[Event]:
    """The job's whole event stream (`events` answers at most 100 at a time)."""
    events: list[Event] = []
    while batch := store.events(job_id, after=events[-1].id if events else "0-0"):
        events += batch
    return events

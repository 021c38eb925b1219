"""Logs and traces of one job across the real stack: JSON lines that name the job and its request in
every process, and one OpenTelemetry trace from the submit request through the worker's stages to the
webhook attempt, sent with the real OTLP/HTTP exporter to a receiver inside the test.

One small stack of its own (Redis, a worker, the webhook worker, the gateway) serves both checks.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from app.stack import LocalStack, ManagedProcess

from .support import (
    WEBHOOK_BACKOFF_S,
    LoopbackServer,
    WebhookReceiver,
    example_images,
    new_webhook_secret,
    stack_env,
    submit_multipart,
    wait_for_status,
    wait_until,
)

STAGES = {"translate", "encode", "denoise", "decode", "upload"}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


class OtlpReceiver(LoopbackServer):
    """An OTLP/HTTP trace endpoint on a loopback port: decodes each export (protobuf) into spans."""

    def __init__(self) -> None:
        super().__init__("otlp")
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        if path != "/v1/traces":
            return 404
        self._receive(gzip.decompress(body) if headers.get("content-encoding") == "gzip" else body)
        return 200

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _receive(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        with self._lock:
            self._spans += spans

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)


def _value(value: Any) -> Any:  # noqa: ANN401 (an OTLP AnyValue)
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def webhooks() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def secret() -> str:
    return new_webhook_secret()


@pytest.fixture(scope="module")
def observed_stack(
    tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver, secret: str
) -> Iterator[LocalStack]:
    env = stack_env(
        tiny_cache,
        DREAMOMNI2_LOG_FORMAT="json",
        DREAMOMNI2_WEBHOOK_SECRET=secret,
        DREAMOMNI2_WEBHOOK_ALLOWLIST="127.0.0.1",
        DREAMOMNI2_WEBHOOK_BACKOFF_S=str(WEBHOOK_BACKOFF_S),
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",  # export within a tenth of a second
    )
    with LocalStack(tmp_path_factory.mktemp("observed-stack"), workers=1, env=env) as stack:
        yield stack


@dataclass(frozen=True)
class FinishedJob:
    id: str
    request_id: str
    trace_id: str


@pytest.fixture(scope="module")
def finished_job(observed_stack: LocalStack, webhooks: WebhookReceiver, secret: str) -> Iterator[FinishedJob]:
    """One two-image edit, submitted with the caller's request id and trace, run to its end, its
    completion webhook delivered."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"X-Request-ID": "obs-request-1", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    url = webhooks.endpoint(secret)
    fields = {
        "instruction": "make the bag in image 1 use the pattern of image 2",
        "steps": 2,
        "webhook_url": url,
    }
    with httpx.Client(base_url=observed_stack.url, timeout=60) as client:
        response = submit_multipart(client, example_images(2), fields, headers=headers)
        assert response.status_code == 202, response.text
        assert response.headers["x-request-id"] == "obs-request-1"
        job = wait_for_status(client, response.json()["id"], timeout=120, watch=observed_stack.processes)
    assert job["status"] == "succeeded", job
    webhooks.wait_for(url, lambda got: len(got) == 1, timeout=60, watch=observed_stack.processes)
    yield FinishedJob(job["id"], "obs-request-1", trace_id)


def test_one_trace_from_the_submit_request_to_the_stages_and_the_webhook(
    observed_stack: LocalStack, otlp: OtlpReceiver, finished_job: FinishedJob
):
    def trace_complete() -> list[ReceivedSpan] | None:
        spans = [s for s in otlp.spans() if s.trace_id == finished_job.trace_id]
        names = {s.name for s in spans}
        return spans if {"run_job", "webhook_attempt"} | STAGES <= names else None

    spans = wait_until(
        trace_complete, timeout=60, what="the job's spans at the receiver", watch=observed_stack.processes
    )
    by_name: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)

    # The gateway continued the caller's trace; its span of the submit names the job.
    (submit,) = [s for s in spans if s.service == "dreamomni2-gateway" and s.parent_id == "00f067aa0ba902b7"]
    assert submit.attributes["dreamomni2.job.id"] == finished_job.id
    assert submit.attributes["dreamomni2.request_id"] == finished_job.request_id
    assert submit.attributes["dreamomni2.adapter"] == "edit"
    assert submit.attributes["dreamomni2.image_count"] == 2

    # The worker's run is its child (through the traceparent stored with the job), the stages the run's.
    (run,) = by_name["run_job"]
    assert run.service == "dreamomni2-worker" and run.parent_id == submit.span_id
    assert run.attributes["dreamomni2.job.id"] == finished_job.id
    assert run.attributes["dreamomni2.memory_mode"] == "resident"
    assert run.attributes["dreamomni2.speed_profile"] == "reference"
    assert run.attributes["dreamomni2.outcome"] == "succeeded"
    for name in STAGES:
        for stage in by_name[name]:
            assert stage.parent_id == run.span_id, name
            assert stage.attributes["dreamomni2.job.id"] == finished_job.id, name
    assert {s.attributes["dreamomni2.stage"] for s in by_name["encode"]} >= {"encode_prompt", "encode_images"}

    # The webhook attempt, in the webhook worker, continues the same trace.
    (attempt,) = by_name["webhook_attempt"]
    assert attempt.service == "dreamomni2-webhooks" and attempt.parent_id == submit.span_id
    assert attempt.attributes["dreamomni2.webhook.event"] == "completed"
    assert attempt.attributes["http.response.status_code"] == 204


def _json_lines(process: ManagedProcess) -> list[dict[str, Any]]:
    lines = [line for line in process.log.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"{process.name}: a line that is not JSON: {line!r}")
    return parsed


def test_every_line_is_json_and_the_jobs_lines_name_it_and_its_request(
    observed_stack: LocalStack, finished_job: FinishedJob
):
    processes = {p.name: p for p in observed_stack.processes}
    for name in ("gateway", "worker-1", "webhooks"):
        entries = _json_lines(processes[name])
        assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries), name
        own = [entry for entry in entries if entry.get("job_id") == finished_job.id]
        assert own, f"{name} logged nothing for job {finished_job.id}"
        assert all(entry.get("request_id") == finished_job.request_id for entry in own), name
        assert all(entry.get("trace_id") == finished_job.trace_id for entry in own), name
        if name != "gateway":
            assert all(entry.get("worker") for entry in own), name
    worker_lines = _json_lines(processes["worker-1"])
    assert any(entry["logger"].startswith("celery") for entry in worker_lines)  # Celery's own, as JSON

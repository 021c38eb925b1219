"""Health, readiness, metrics, the OpenAPI document, and jobs expiring after their TTL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.stack import LocalStack, free_port

from .conftest import Service
from .support import assert_error, stack_env, submit_json, wait_for_status, wait_until


def metric(client: httpx.Client, name: str, **labels: str) -> float | None:
    """One sample of the gateway's `/metrics`, read with Prometheus' own text parser."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_healthz_readyz_and_metrics(service: Service, alice: httpx.Client) -> None:
    assert alice.get("/healthz").json() == {"status": "ok"}
    ready = alice.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "redis": "ok",
        "workers": {"up": 1, "ready": 1, "memory_modes": {"resident": 1}, "speed_fallbacks": {}},
        "queue_depth": 0,
    }

    metrics = alice.get("/metrics")

    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE dreamomni2_http_requests_total counter" in metrics.text.splitlines()
    assert metric(alice, "dreamomni2_queue_depth") == 0
    assert metric(alice, "dreamomni2_workers", state="ready") == 1
    readyz_200 = {"route": "/readyz", "method": "GET", "status": "200"}
    assert metric(alice, "dreamomni2_http_requests_total", **readyz_200) >= 1


def test_metrics_count_submissions_and_refusals(service: Service, alice: httpx.Client) -> None:
    submitted = {"task": "generate", "adapter": "base"}
    before = metric(alice, "dreamomni2_jobs_submitted_total", **submitted) or 0
    refused = metric(alice, "dreamomni2_jobs_rejected_total", code="invalid_steps") or 0

    job = submit_json(alice, [], {"instruction": "A cat", "steps": 2}, headers={"Prefer": "wait=30"})
    assert_error(submit_json(alice, [], {"instruction": "A cat", "steps": 0}), 422, "invalid_steps")

    assert job.json()["status"] == "succeeded"
    assert metric(alice, "dreamomni2_jobs_submitted_total", **submitted) == before + 1
    assert metric(alice, "dreamomni2_jobs_rejected_total", code="invalid_steps") == refused + 1


def refs(node: object) -> Iterator[str]:
    """Every `$ref` in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_openapi_documents_both_bodies_and_the_error_envelope(service: Service, alice: httpx.Client) -> None:
    schema = alice.get("/openapi.json").json()

    submit = schema["paths"]["/v1/jobs"]["post"]
    content = submit["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/JobRequestJSON"}
    form = content["multipart/form-data"]["schema"]
    assert form["properties"]["images"]["items"] == {"type": "string", "format": "binary"}
    assert {"instruction", "task", "seed", "steps", "output_format"} <= set(form["properties"])
    envelope = {"$ref": "#/components/schemas/ErrorEnvelope"}
    for status in ("401", "413", "415", "422"):
        assert submit["responses"][status]["content"]["application/json"]["schema"] == envelope, status
    assert set(submit["responses"]) >= {"200", "202"}
    for path in ("/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result"):
        assert schema["paths"][path]["get"]["responses"]["404"]["content"]["application/json"]["schema"] == (
            envelope
        )
    components = schema["components"]["schemas"]
    assert components["ErrorEnvelope"]["properties"]["error"] == {
        "$ref": "#/components/schemas/HttpErrorInfo"
    }
    assert {"code", "message"} <= set(components["HttpErrorInfo"]["required"])
    assert "request_id" in components["HttpErrorInfo"]["properties"]
    assert {"JobRequestJSON", "Job", "Task", "OutputFormat"} <= set(components)
    dangling = {ref for ref in refs(schema) if ref.removeprefix("#/components/schemas/") not in components}
    assert not dangling, f"$refs to schemas the document does not define: {dangling}"

    docs = alice.get("/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    assert "swagger" in docs.text.lower()


def test_expired_job_is_404(service: Service, main_stack: LocalStack) -> None:
    ttl_s = 2
    port = free_port()
    gateway = main_stack.start_gateway(port=port, env={"DREAMOMNI2_JOB_TTL_S": str(ttl_s)})
    try:
        client = service.client("alice", base_url=f"http://127.0.0.1:{port}")
        response = submit_json(
            client, [], {"instruction": "A cat", "steps": 2}, headers={"Prefer": "wait=30"}
        )
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "succeeded"
        assert client.get(job["links"]["result"]).status_code == 200

        def gone() -> httpx.Response | None:
            answer = client.get(job["links"]["self"])
            return answer if answer.status_code == 404 else None

        assert_error(
            wait_until(gone, timeout=ttl_s + 10, what="the job to expire", watch=service.core),
            404,
            "job_not_found",
        )
        assert_error(client.get(job["links"]["result"]), 404, "job_not_found")
        # The main gateway (other TTL setting) reads the same Redis: gone there too, and nothing is left.
        assert_error(service.client("alice").get(job["links"]["self"]), 404, "job_not_found")
        assert not list(service.redis.scan_iter(match=f"do2:job:{job['id']}*"))
    finally:
        gateway.stop()


def readiness(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    return response.json()


#: What `/readyz` says of the workers when none is up.
NO_WORKERS = {"up": 0, "ready": 0, "memory_modes": {}, "speed_fallbacks": {}}


def test_readiness_follows_workers_and_jobs_wait_for_one(tiny_cache: Path, tmp_path: Path) -> None:
    with (
        LocalStack(tmp_path, workers=0, env=stack_env(tiny_cache)) as stack,
        httpx.Client(base_url=stack.url, timeout=30) as client,
    ):
        assert readiness(client)["workers"] == NO_WORKERS
        queued = submit_json(client, [], {"instruction": "A cat", "steps": 2})
        assert queued.status_code == 202, queued.text
        job = queued.json()
        assert job["status"] == "queued" and job["queue_position"] == 1
        assert readiness(client)["queue_depth"] == 1

        def worker_ready() -> dict[str, Any] | None:
            body = readiness(client)  # 200 all along, while the worker starts and loads its models
            return body if body["workers"]["ready"] >= 1 else None

        # A worker in another memory mode reports it; the job runs the same in any mode.
        worker = stack.start_worker(env={"DREAMOMNI2_MEMORY": "low"})
        seen = wait_until(worker_ready, timeout=120, what="the worker to report ready", watch=stack.processes)

        assert seen["workers"] == {"up": 1, "ready": 1, "memory_modes": {"low": 1}, "speed_fallbacks": {}}
        done = wait_for_status(client, job["id"], watch=stack.processes)
        assert done["status"] == "succeeded"
        assert readiness(client)["queue_depth"] == 0

        worker.stop()
        assert readiness(client)["workers"] == NO_WORKERS


def test_readyz_is_503_while_redis_is_down(tiny_cache: Path, tmp_path: Path) -> None:
    stack = LocalStack(tmp_path, workers=0, env=stack_env(tiny_cache))  # Redis never started
    try:
        gateway = stack.start_gateway()
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503
            body = ready.json()
            assert body["status"] == "unavailable" and body["redis"] != "ok"
            assert client.get("/healthz").status_code == 200

            response = submit_json(client, [], {"instruction": "A cat"})
            assert_error(response, 503, "unavailable")
            assert_error(client.get("/v1/jobs/j_" + "0" * 32), 503, "unavailable")
            assert client.get("/metrics").status_code == 200
        # Answered as errors the service expects, on the same kept-alive connection, not as crashes.
        assert "Traceback" not in gateway.log_tail(500)
    finally:
        stack.stop()

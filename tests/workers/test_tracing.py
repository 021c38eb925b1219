"""Tracing is off unless an OTLP endpoint is set, and then costs nothing: no SDK tracing, no exporter.

With it on, the real stack's traces are checked in `tests/integration/test_observability.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers import tracing

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
    ],
)
def test_only_an_exporter_endpoint_turns_it_on(environ: dict[str, str], on: bool):
    assert tracing.requested(environ) is on


def test_off_the_helpers_do_nothing():
    assert not tracing.enabled()
    with tracing.span("anything", parent="00-" + "1" * 32 + "-" + "2" * 16 + "-01", kind="consumer"):
        tracing.annotate({"a": 1}, error="no")
        assert tracing.current_traceparent() is None and tracing.current_trace_id() is None
    assert tracing.stage_spans() is None


def test_off_no_process_loads_the_sdks_tracing_or_the_exporter():
    # The gateway built, and the workers' modules imported, with OpenTelemetry's variables set but
    # no endpoint. (redis-py itself imports the SDK's metrics when the SDK is installed.)
    code = (
        "import sys; from app.main import create_app; from app.settings import GatewaySettings; "
        "import workers.__main__, workers.webhooks, workers.runtime, workers.tracing as t; "
        "create_app(GatewaySettings()); assert not t.configure_tracing('x'); "
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', "
        "'opentelemetry.exporter', 'opentelemetry.instrumentation', 'opentelemetry.proto'))))"
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_EXPORTER_OTLP", "OTEL_SDK_DISABLED"))
    }
    env |= {"DREAMOMNI2_REDIS_URL": "redis://127.0.0.1:1/0", "OTEL_SERVICE_NAME": "off"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"

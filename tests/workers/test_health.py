"""The worker's liveness file and the probe command that reads it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from models.settings import EngineSettings
from workers.config import WorkerSettings
from workers.consuming import CONSUMER, consumer_grace_s
from workers.runtime import WorkerRuntime

ROOT = Path(__file__).resolve().parents[2]


def probe(path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DREAMOMNI2_LIVENESS_FILE": str(path)}
    return subprocess.run(
        [sys.executable, "-m", "workers.health", *args], env=env, capture_output=True, text=True, check=False
    )


def test_probe_reads_the_file_age(tmp_path):
    alive = tmp_path / "alive"
    assert probe(alive).returncode == 1
    alive.touch()
    assert probe(alive).returncode == 0
    old = time.time() - 120
    os.utime(alive, (old, old))
    result = probe(alive, "--max-age", "60")
    assert result.returncode == 1 and "limit 60s" in result.stdout
    # The probe's own start (seconds on a loaded machine) adds to the file's age.
    age = int(re.search(r"is (\d+)s old", result.stdout).group(1))
    assert 120 <= age < 150


def test_liveness_is_withheld_while_loading_and_when_a_job_stalls(tmp_path):
    settings = WorkerSettings(
        liveness_file=tmp_path / "alive", stall_timeout_s=5, redis_url="redis://127.0.0.1:1/0"
    )
    runtime = WorkerRuntime(settings, EngineSettings())
    CONSUMER.set(True)  # as Celery's consumer, started, says (`workers.consuming.Consuming`)
    runtime._touch_liveness()
    assert not settings.liveness_file.exists()  # models not loaded yet
    runtime._info["ready"] = True
    runtime._touch_liveness()
    assert settings.liveness_file.exists()  # idle and ready
    settings.liveness_file.unlink()
    runtime._current = ("j_1", "token")
    runtime._last_progress = time.monotonic()
    runtime._touch_liveness()
    assert settings.liveness_file.exists()  # busy and moving
    settings.liveness_file.unlink()
    runtime._last_progress = time.monotonic() - 10
    runtime._touch_liveness()
    assert not settings.liveness_file.exists()  # busy and stuck: let the probe fail


def test_liveness_is_withheld_when_the_consumer_stopped_while_redis_answers(tmp_path, monkeypatch):
    settings = WorkerSettings(liveness_file=tmp_path / "alive", redis_url="redis://127.0.0.1:1/0")
    runtime = WorkerRuntime(settings, EngineSettings())
    runtime._info["ready"] = True
    CONSUMER.set(False)
    runtime._touch_liveness()
    assert settings.liveness_file.exists()  # stopped a moment ago: a reconnection, within the grace
    settings.liveness_file.unlink()
    monkeypatch.setattr(CONSUMER, "since", time.monotonic() - consumer_grace_s(settings.heartbeat_s) - 1)
    runtime._touch_liveness(redis_answers=False)
    assert settings.liveness_file.exists()  # waiting for a Redis that is away: alive
    settings.liveness_file.unlink()
    runtime._touch_liveness()
    assert not settings.liveness_file.exists()  # Redis answers, the consumer consumes nothing: dead
    CONSUMER.set(True)
    runtime._touch_liveness()
    assert settings.liveness_file.exists()


def test_a_worker_with_a_refused_setting_exits_at_once_with_the_reason(tmp_path):
    # Precision is checked before anything is loaded or connected: no Redis is needed to be refused.
    env = {**os.environ, "DREAMOMNI2_DTYPE": "float16", "DREAMOMNI2_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run(
        [sys.executable, "-m", "workers"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 78
    assert "T5-XXL overflows in float16" in result.stderr


def test_worker_help_answers_before_loading_or_connecting(tmp_path):
    # Models that cannot be found and a Redis that is not there: help must need neither.
    env = {
        **os.environ,
        "DREAMOMNI2_PRESET": "dreamomni2",
        "DREAMOMNI2_CACHE_DIR": str(tmp_path / "nothing-here"),
        "DREAMOMNI2_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "workers", "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m workers") and "celery worker" in result.stdout
    assert not (tmp_path / "nothing-here").exists() and "engine" not in result.stderr
    statuses = " ".join(result.stdout.split())  # argparse wraps the epilog
    assert "Exit status 78: a setting was refused" in statuses
    assert "Exit status 75: the GPU failed for good" in statuses

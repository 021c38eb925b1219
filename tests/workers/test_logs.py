"""Log lines: JSON or text, with the job, request, trace and worker they belong to."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from workers.logs import (
    LogFormat,
    celery_flags,
    configure_logging,
    log_context,
    log_format_from_env,
    set_process_fields,
)


@pytest.fixture
def configured() -> Iterator[None]:
    """Our handler on the root logger for the test, removed after it (the test runner's stay)."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if h.get_name() == "dreamomni2"]:
        root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_the_context_and_stay_one_line_each(configured, capsys):
    configure_logging(LogFormat.JSON)
    log = logging.getLogger("tests.logs")
    with log_context(job_id="j_1", request_id="req-1"):
        log.info("two\nlines")
        with log_context(job_id=None, request_id="req-2"):  # None keeps what is bound
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("failed")
    log.warning("outside")
    lines = capsys.readouterr().err.strip().splitlines()
    first, second, third = (json.loads(line) for line in lines)
    assert {"time", "level", "logger", "message"} <= set(first)
    assert first["time"].endswith("+00:00") and first["logger"] == "tests.logs"
    assert (first["message"], first["job_id"], first["request_id"]) == ("two\nlines", "j_1", "req-1")
    assert (second["job_id"], second["request_id"], second["level"]) == ("j_1", "req-2", "ERROR")
    assert "ValueError: boom" in second["exception"]
    assert "job_id" not in third and "request_id" not in third and "trace_id" not in third


def test_process_fields_and_text_lines(configured, capsys, monkeypatch):
    monkeypatch.setattr("workers.logs._process_fields", {})
    set_process_fields(worker="worker-7")
    configure_logging(LogFormat.TEXT)
    with log_context(job_id="j_2"):
        logging.getLogger("tests.logs").warning("hello")
    logging.getLogger("tests.logs").warning("plain")
    first, second = capsys.readouterr().err.strip().splitlines()
    assert first.endswith("WARNING tests.logs: hello [job_id=j_2 worker=worker-7]")
    assert second.endswith("WARNING tests.logs: plain [worker=worker-7]")


def test_configuring_twice_keeps_one_handler_and_takes_over_celery_and_uvicorn(configured):
    from celery.signals import setup_logging

    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addHandler(logging.StreamHandler())
    uvicorn_logger.propagate = False
    configure_logging(LogFormat.JSON)
    configure_logging(LogFormat.TEXT)
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "dreamomni2"]
    assert len(ours) == 1
    assert not uvicorn_logger.handlers and uvicorn_logger.propagate
    # With a receiver of `setup_logging`, a Celery worker adds no handler and redirects no stream.
    assert setup_logging.has_listeners()


def test_the_format_before_the_settings_and_celerys_banner(monkeypatch):
    monkeypatch.setenv("DREAMOMNI2_LOG_FORMAT", " JSON ")
    assert log_format_from_env() is LogFormat.JSON
    monkeypatch.setenv("DREAMOMNI2_LOG_FORMAT", "yaml")  # refused by the settings, text until then
    assert log_format_from_env() is LogFormat.TEXT
    assert celery_flags(LogFormat.JSON) == ["--quiet"] and celery_flags(LogFormat.TEXT) == []

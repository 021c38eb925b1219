"""Log lines of every process: text for people, or one JSON object per line for a log pipeline.

`DREAMOMNI2_LOG_FORMAT` picks the format (`text` in development, `json` in the images). Either way a
line carries, where known, the job, the request, the trace and the worker it belongs to: the gateway
binds the request id, the workers bind the job id and its request id (stored with the job), and the
trace id comes from the current span when tracing is on (`workers.tracing`). One handler on the root
logger formats everything: our loggers, uvicorn's and Celery's alike.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from enum import StrEnum

from workers import tracing


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


#: The fields a line carries where known, in this order.
CONTEXT_FIELDS = ("job_id", "request_id", "trace_id", "worker")
#: Loggers that bring handlers of their own: theirs are removed so their lines reach the root's.
_OWN_HANDLERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.redirected")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"

_context: ContextVar[dict[str, str]] = ContextVar("dreamomni2_log_context", default={})  # noqa: B039 (never mutated)
#: Fields of the whole process (the worker's name), under those of the context.
_process_fields: dict[str, str] = {}


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Lines logged inside the block (in this thread or task, and what it starts) carry `fields`;
    a None or empty value leaves the field as it was."""
    token = _context.set({**_context.get(), **{name: value for name, value in fields.items() if value}})
    try:
        yield
    finally:
        _context.reset(token)


def set_process_fields(**fields: str) -> None:
    """Fields every line of this process carries (unless the context says otherwise)."""
    _process_fields.update(fields)


def context_fields() -> dict[str, str]:
    """The fields a line logged here and now carries."""
    fields = {**_process_fields, **_context.get()}
    trace_id = tracing.current_trace_id()
    if trace_id:
        fields["trace_id"] = trace_id
    return fields


class ContextFilter(logging.Filter):
    """Puts the context's fields on every record the handler formats (a record's own win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = context_fields()
        for name in CONTEXT_FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, fields.get(name))
        shown = " ".join(
            f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if getattr(record, name)
        )
        record.context = f" [{shown}]" if shown else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the context's fields,
    and the traceback of an exception; newlines inside a message stay inside its line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            if value := getattr(record, name, None):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (as logging's last-resort handler does), so a
    replaced or captured stderr never leaves it writing to a closed stream."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> object:  # type: ignore[override]
        return sys.stderr


def log_format_from_env() -> LogFormat:
    """`DREAMOMNI2_LOG_FORMAT` before the settings are read (so that their own errors are logged in
    it); a value the settings would refuse is text here, and refused by them."""
    value = os.environ.get("DREAMOMNI2_LOG_FORMAT", "").strip().lower()
    return LogFormat(value) if value in tuple(LogFormat) else LogFormat.TEXT


def configure_logging(log_format: LogFormat | str | None = None, level: int = logging.INFO) -> None:
    """Send every log line of this process to stderr, in `log_format` (default: the environment's).

    Safe to call again (the handler is replaced, not added twice); other handlers on the root logger
    (a test runner's) are left alone. Celery is told not to set up logging of its own.
    """
    log_format = LogFormat(log_format) if log_format else log_format_from_env()
    handler = _StderrHandler()
    handler.set_name("dreamomni2")
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format is LogFormat.JSON else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "dreamomni2"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # Python's warnings become lines of the same format
    for name in _OWN_HANDLERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    _keep_celery_off_logging()


def adopt_library_loggers(log_format: LogFormat) -> None:
    """Before the model stack loads (GPU workers only): transformers and diffusers, which log through a
    handler of their own from their import on, send their lines through ours instead, and in JSON
    their progress bars (drawn on stderr, not logged) are off."""
    for library in ("transformers", "diffusers"):
        try:
            logs = importlib.import_module(f"{library}.utils.logging")
        except ImportError:  # not a worker's install
            continue
        logs.disable_default_handler()
        logs.enable_propagation()
        if log_format is LogFormat.JSON:
            logs.disable_progress_bar()
    if log_format is LogFormat.JSON and importlib.util.find_spec("huggingface_hub") is not None:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def celery_flags(log_format: LogFormat) -> list[str]:
    """Options of `celery` (they go before `worker`) for the log format: in JSON, no start-up banner
    (printed, not logged, it would break the one-object-per-line stream)."""
    return ["--quiet"] if log_format is LogFormat.JSON else []


def _keep_celery_off_logging() -> None:
    """A receiver of Celery's `setup_logging` makes a worker leave logging as it is: no handlers of its
    own, and stdout and stderr not redirected into a logger."""
    from celery.signals import setup_logging

    setup_logging.connect(_leave_logging_alone, weak=False, dispatch_uid="dreamomni2-logging")


def _leave_logging_alone(**kwargs: object) -> None:
    return None

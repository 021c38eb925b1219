"""What the `dreamomni2` command's parts share: exit codes, printing for people and programs, and the
argument types of its options."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from api_schemas.api import Job
from api_schemas.common import WebhookEvent
from api_schemas.loras import LoraChoice
from dreamomni2._core import API_KEY_ENV, DEFAULT_SERVER, SERVER_ENV, parse_lora
from dreamomni2.errors import (
    AuthenticationError,
    ConflictError,
    DreamOmni2Error,
    InvalidInputError,
    JobCanceledError,
    JobFailedError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    WaitTimeoutError,
)

# Exit codes: one per kind of outcome a script may branch on.


# Exit codes: one per kind of outcome a script may branch on.
EXIT_OK = 0


EXIT_ERROR = 1  # anything else: an unexpected server error (500), a local I/O error


EXIT_USAGE = 2  # argparse's own: bad arguments, a missing input file


EXIT_REFUSED = 3


EXIT_AUTH = 4


EXIT_NOT_FOUND = 5


EXIT_FAILED = 6


EXIT_CANCELED = 7


EXIT_UNAVAILABLE = 8


EXIT_TIMEOUT = 9


EXIT_INTERRUPTED = 130


EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}    done: the image is saved, or the job's status, events or cancel were answered
  {EXIT_ERROR}    another error (an unexpected server error, a file that cannot be written)
  {EXIT_USAGE}    bad arguments, or an input image that cannot be read
  {EXIT_REFUSED}    the service refused the request: invalid input (too many images, steps out of range,
       a bad image, ...) or a job in the wrong state (no result yet, already finished)
  {EXIT_AUTH}    the API key is missing or not accepted
  {EXIT_NOT_FOUND}    no such job (unknown id, another key's job, or expired)
  {EXIT_FAILED}    the job failed (the message says why); dataset, bench, prompts: some pairs, cases or
       keywords failed (the summary lists them)
  {EXIT_CANCELED}    the job was canceled (by request or by its deadline)
  {EXIT_UNAVAILABLE}    the service is unreachable or unavailable (connection refused, 503, 429)
  {EXIT_TIMEOUT}    --timeout passed before the job ended (it goes on)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); the job goes on

environment:
  {SERVER_ENV}   the service's URL (default {DEFAULT_SERVER}, where `make up` serves)
  {API_KEY_ENV}  the API key, sent as `Authorization: Bearer <key>`
"""


def exit_code(error: DreamOmni2Error) -> int:
    """The exit code for an error (see EXIT_CODES_HELP)."""
    for kind, code in (
        (JobFailedError, EXIT_FAILED),
        (JobCanceledError, EXIT_CANCELED),
        (WaitTimeoutError, EXIT_TIMEOUT),
        (InvalidInputError, EXIT_REFUSED),
        (ConflictError, EXIT_REFUSED),
        (AuthenticationError, EXIT_AUTH),
        (NotFoundError, EXIT_NOT_FOUND),
        (ServiceUnavailableError, EXIT_UNAVAILABLE),
        (RateLimitError, EXIT_UNAVAILABLE),
    ):
        if isinstance(error, kind):
            return code
    return EXIT_ERROR


# Output ---------------------------------------------------------------------------------------------------
def say(message: str) -> None:
    """A message for the person at the terminal (stderr: stdout carries results)."""
    print(message, file=sys.stderr, flush=True)


def print_json(value: object) -> None:
    print(json.dumps(value, indent=None, separators=(",", ":")), flush=True)


def job_json(job: Job) -> dict[str, Any]:
    return job.model_dump(mode="json", by_alias=True)


# Arguments ------------------------------------------------------------------------------------------------
def existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return value


def lora_option(value: str) -> LoraChoice:
    """`--lora NAME[:SCALE]`."""
    try:
        return parse_lora(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).splitlines()[0]) from None


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return number


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {value}")
    return number


def fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {value}")
    return number


def size(value: str) -> tuple[int, int]:
    width, x, height = value.lower().partition("x")
    if not x or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, like 1024x768: {value}")
    return int(width), int(height)


def webhook_events(value: str) -> list[str]:
    events = [part.strip() for part in value.split(",") if part.strip()]
    allowed = [event.value for event in WebhookEvent]
    unknown = [event for event in events if event not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown event(s) {', '.join(unknown)}; use {', '.join(allowed)}")
    return events

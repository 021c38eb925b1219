"""Schemathesis against the live gateway's own OpenAPI document: the typed multipart and JSON bodies
with their ranges, the headers, every operation; no 5xx, no answer outside what the document says.

The event stream is left out: with no worker a queued job's stream stays open (as it should), so
every call would end in the fuzzer's timeout; its header is refused before the stream (tests/app).
Its own small stack with keys on and no worker: the fuzzer's jobs only queue (nothing has to run
them for the API's answers to be checked), and the main stack's worker is left to the other tests.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from app.auth import hash_key, new_key
from app.stack import LocalStack

from .support import stack_env

#: What must hold for every request the fuzzer makes. (`positive_data_acceptance` is left out: a
#: schema cannot say "an edit needs an image" or "this webhook host is private", so some requests
#: the schema allows are refused, with a documented 422.)
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_fuzzing_the_live_api_finds_no_5xx_and_nothing_undocumented(tiny_cache: Path, tmp_path: Path) -> None:
    key = new_key()
    # `Prefer: wait` not held at all: with no worker every wait would run to its end.
    env = stack_env(
        tiny_cache,
        DREAMOMNI2_API_KEYS=f"fuzz:{hash_key(key)}",
        DREAMOMNI2_RESULT_URL_SECRET=new_key(),
        DREAMOMNI2_MAX_WAIT_S="0",
    )
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert schemathesis, "schemathesis is a dev dependency: make setup"
    with LocalStack(tmp_path, workers=0, env=env) as stack:
        result = subprocess.run(
            [
                schemathesis, "run", f"{stack.url}/openapi.json", "--checks", CHECKS,
                "--header", f"Authorization: Bearer {key}", "--max-examples", "20", "--workers", "1",
                "--seed", "20261202", "--exclude-operation-id", "job_events",
                "--request-timeout", "20", "--no-color",
            ],
            capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert "Traceback" not in stack.processes[-1].log_tail(2000)

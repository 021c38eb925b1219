"""GPU failures inside real worker processes, injected on the CPU.

Out of memory fails that job (`out_of_memory`) and the worker runs the next one. A sticky CUDA error
(the context is poisoned) makes the worker give its job back and exit with status 75; the job runs again
on the next worker, which here is also one whose compiled speed profile cannot compile (no C++ compiler):
it serves with `reference`, and `/readyz` counts it.

The faulty worker starts with a folder on its PYTHONPATH holding a `sitecustomize` module, which Python
imports at start-up, before `python -m workers` runs. It wraps `DreamOmni2Pipeline.encode_prompt` to
remember the last prompt and `predict_velocity` to raise, from denoising step `FAIL_AT_STEP` on, the error
a marker in that prompt names, as CUDA reports it. Jobs go with `translate: false`: the instruction is the
prompt.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.stack import ROOT, LocalStack, ManagedProcess
from workers.store import JobStore, Store

from .support import (
    FAST_LEASES,
    TERMINAL,
    all_events,
    assert_error,
    png_bytes,
    stack_env,
    submit_json,
    wait_for_status,
    wait_until,
)

OUT_OF_MEMORY = "[inject: out of memory]"
STICKY = "[inject: illegal memory access]"
#: The 0-based denoising step whose transformer pass fails: two steps run first.
FAIL_AT_STEP = 2
STEPS = 4
#: Exit status of a worker whose GPU failed for good (workers.runtime.EXIT_DEVICE_LOST, EX_TEMPFAIL).
EXIT_DEVICE_LOST = 75

SITECUSTOMIZE = f'''"""Written by {Path(__file__).name}: device failures injected into the pipeline."""

from models.pipeline import DreamOmni2Pipeline

FAILURES = {{
    {OUT_OF_MEMORY!r}: "CUDA error: out of memory\\nCUDA kernel errors might be asynchronously reported "
    "at some other API call, so the stacktrace below might be incorrect.",
    {STICKY!r}: "CUDA error: an illegal memory access was encountered\\nCompile with `TORCH_USE_CUDA_DSA` "
    "to enable device-side assertions.",
}}
last_prompt = [""]
encode_prompt = DreamOmni2Pipeline.encode_prompt
predict_velocity = DreamOmni2Pipeline.predict_velocity


def remembering_encode_prompt(self, *args, **kwargs):
    prompt = kwargs.get("prompt", args[0] if args else None)
    if prompt is not None:  # None: the pipeline passing on embeddings the engine encoded
        last_prompt[0] = prompt if isinstance(prompt, str) else " ".join(prompt)
    return encode_prompt(self, *args, **kwargs)


def failing_predict_velocity(self, *args, **kwargs):
    if kwargs["step"] >= {FAIL_AT_STEP}:
        for marker, message in FAILURES.items():
            if marker in last_prompt[0]:
                raise RuntimeError(message)
    return predict_velocity(self, *args, **kwargs)


DreamOmni2Pipeline.encode_prompt = remembering_encode_prompt
DreamOmni2Pipeline.predict_velocity = failing_predict_velocity
'''


@dataclass
class FaultyStack:
    """A stack with short leases whose one worker fails the jobs that carry a marker."""

    stack: LocalStack
    client: httpx.Client
    store: JobStore
    worker: ManagedProcess


@pytest.fixture(scope="module")
def faulty(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyStack]:
    """Shared by this module's tests, in file order: the sticky-error test ends the faulty worker."""
    workdir = tmp_path_factory.mktemp("device-failures")
    inject = workdir / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(inject), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    with (
        LocalStack(workdir, workers=0, env=stack_env(tiny_cache, **FAST_LEASES)) as stack,
        httpx.Client(base_url=stack.url, timeout=30) as client,
    ):
        worker = stack.start_worker(env={"PYTHONPATH": path})
        stack.wait_workers_ready(1)
        yield FaultyStack(stack, client, Store.from_url(stack.redis_url).jobs, worker)


def edit(instruction: str, steps: int = STEPS) -> dict[str, Any]:
    return {"instruction": instruction, "task": "edit", "steps": steps, "translate": False}


def test_out_of_memory_fails_the_job_and_the_worker_runs_the_next(faulty: FaultyStack) -> None:
    client, worker = faulty.client, faulty.worker
    pid = worker.pid
    response = submit_json(client, [png_bytes()], edit(f"Make the sky red {OUT_OF_MEMORY}"))
    assert response.status_code == 202, response.text

    failed = wait_for_status(client, response.json()["id"], timeout=60, watch=[worker])

    assert failed["status"] == "failed"
    error = failed["error"]
    assert error["code"] == "out_of_memory"
    # What the caller can do about it: fewer images, or an operator's lower memory mode.
    assert error["message"].startswith("The GPU ran out of memory for 1 input image(s) in memory mode")
    assert "send fewer reference images" in error["message"] and "lower memory mode" in error["message"]
    assert error["details"] == {"images": 1, "memory_mode": "resident"}
    assert failed["progress"] == {"stage": "denoise", "step": FAIL_AT_STEP, "total": STEPS}
    assert failed["attempts"] == 1
    assert_error(client.get(failed["links"]["result"]), 409, "job_failed")

    after = submit_json(client, [png_bytes()], edit("Make the sky blue", 2), headers={"Prefer": "wait=30"})

    assert after.json()["status"] == "succeeded", after.json()["error"]
    assert worker.alive() and worker.pid == pid
    assert faulty.store.get(after.json()["id"]).worker == worker.name


def test_a_sticky_error_exits_75_and_the_job_runs_on_the_next_worker(
    faulty: FaultyStack, tmp_path: Path
) -> None:
    stack, client, store, worker = faulty.stack, faulty.client, faulty.store, faulty.worker
    assert worker.alive(), "the faulty worker is gone: run this module's tests in file order"
    response = submit_json(client, [png_bytes()], edit(f"Make the sky green {STICKY}"))
    job_id = response.json()["id"]
    submitted = time.monotonic()

    status = wait_until(worker.popen.poll, timeout=60, what="the faulty worker to exit")
    exited_s = time.monotonic() - submitted

    assert status == EXIT_DEVICE_LOST, worker.log_tail()
    log = worker.log.read_text()
    assert "CRITICAL" in log and "illegal memory access" in log, worker.log_tail()
    assert f"exits with status {EXIT_DEVICE_LOST} to be replaced" in log
    # Given back at once, not failed: no outcome, no lease; the worker left the registry.
    record = store.get(job_id)
    assert record.status.value == "running" and record.error is None and record.attempts == 1
    assert not store.redis.exists(f"do2:lease:{job_id}")
    assert not store.redis.exists(f"do2:worker:{worker.name}")
    assert client.get("/readyz").json()["workers"]["up"] == 0

    # The next worker's GPU is fine; its compiled profile cannot compile here (no C++ compiler for
    # Inductor, a fresh compile cache), so it serves with `reference`.
    replacement = stack.start_worker(
        env={
            "DREAMOMNI2_SPEED": "compiled",
            "CXX": "/nonexistent/c++",
            "DREAMOMNI2_COMPILE_CACHE_DIR": str(tmp_path / "compile-cache"),
        }
    )
    done = wait_for_status(client, job_id, timeout=90, watch=[replacement])

    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and store.get(job_id).worker == replacement.name
    events = all_events(store, job_id)
    assert [e.type for e in events if e.type in TERMINAL] == ["succeeded"]
    assert [e.data.get("attempt") for e in events if e.type == "started"] == [1, 2]
    assert [e.data for e in events if e.type == "queued" and e.data] == [
        {"reason": "worker_lost", "attempts": 1}
    ]
    assert client.get("/readyz").json()["workers"] == {
        "up": 1,
        "ready": 1,
        "memory_modes": {"resident": 1},
        "speed_fallbacks": {"reference": 1},
    }
    warning = "speed profile compiled not applied: this worker serves with reference instead"
    assert warning in replacement.log.read_text()
    print(f"\nthe faulty worker exited {exited_s:.1f}s after the job was submitted")

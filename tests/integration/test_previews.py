"""Live previews through the real worker and gateway: the SSE `progress` events of every
DREAMOMNI2_PREVIEW_EVERY-th denoising step carry a JPEG data URI; the job object never does."""

from __future__ import annotations

import base64
import io

import httpx
from PIL import Image

from workers.config import WorkerSettings

from .conftest import Service
from .support import get_job, sse_events, submit_json

#: The main stack's workers run with the default.
EVERY = WorkerSettings.model_fields["preview_every"].default
PREFIX = "data:image/jpeg;base64,"


def test_progress_events_carry_previews_and_the_job_does_not(service: Service, alice: httpx.Client):
    steps = 2 * EVERY + 2
    created = submit_json(
        alice, [], {"instruction": "A red bag", "task": "generate", "steps": steps, "seed": 3}
    )
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]

    with alice.stream("GET", f"/v1/jobs/{job_id}/events", timeout=30) as stream:
        assert stream.status_code == 200, stream.read()
        events = list(sse_events(stream))
    assert events[-1].event == "succeeded"
    denoise = [
        event.json() for event in events if event.event == "progress" and event.json()["stage"] == "denoise"
    ]
    assert [data["step"] for data in denoise] == list(range(1, steps + 1))
    assert [data["step"] for data in denoise if "preview" in data] == [EVERY, 2 * EVERY]
    for data in denoise:
        if "preview" in data:
            assert data["preview"].startswith(PREFIX)
            picture = Image.open(io.BytesIO(base64.b64decode(data["preview"].removeprefix(PREFIX))))
            # The tiny preset's 64x64 output: one preview pixel per 8x8 of it.
            assert (picture.format, picture.size) == ("JPEG", (8, 8))
    assert all("preview" not in event.json() for event in events if event.event != "progress")

    job = get_job(alice, job_id)
    assert job["progress"] == {"stage": "decode", "step": 1, "total": 1}
    assert "preview" not in events[-1].data

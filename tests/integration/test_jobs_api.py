"""Submit, poll and download through the real gateway and worker: every task, image count and encoding."""

from __future__ import annotations

import io
import time
from datetime import datetime
from typing import Any

import httpx
import pytest
from PIL import Image

from .conftest import Service
from .support import (
    LONG_STEPS,
    PIL_FORMATS,
    TIMING_STAGES,
    example_images,
    get_job,
    submit_json,
    submit_multipart,
    wait_for_status,
)

SUBMITTERS = {"multipart": submit_multipart, "json": submit_json}

# (task, images, expected adapter): a LoRA runs only when reference images are present.
CASES = [
    ("edit", 1, "base"),
    ("edit", 2, "edit"),
    ("edit", 5, "edit"),
    ("generate", 0, "base"),
    ("generate", 1, "generation"),
    ("generate", 2, "generation"),
    ("generate", 5, "generation"),
]
FORMATS = ["png", "jpeg", "webp"]
MATRIX = [
    pytest.param(encoding, task, count, adapter, FORMATS[(n + shift) % 3], id=f"{encoding}-{task}-{count}")
    for shift, encoding in enumerate(SUBMITTERS)
    for n, (task, count, adapter) in enumerate(CASES)
]


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def download(client: httpx.Client, job: dict[str, Any]) -> Image.Image:
    """Fetch the result and check it is the image the job object describes."""
    result = job["result"]
    response = client.get(result["url"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == result["content_type"]
    assert len(response.content) == result["bytes"]
    image = Image.open(io.BytesIO(response.content))
    image.load()
    assert image.size == (result["width"], result["height"])
    return image


@pytest.mark.parametrize(("encoding", "task", "count", "adapter", "output_format"), MATRIX)
def test_submit_poll_and_download(
    service: Service,
    alice: httpx.Client,
    encoding: str,
    task: str,
    count: int,
    adapter: str,
    output_format: str,
) -> None:
    instruction = "Put the hat of image 2 on the person in image 1." if count > 1 else "A red bag on a table."
    seeded = count % 2 == 0  # the others get a random seed, reported back
    fields: dict[str, object] = {
        "instruction": instruction,
        "task": task,
        "output_format": output_format,
        "steps": 4,
        **({"seed": 1234 + count} if seeded else {}),
    }

    response = SUBMITTERS[encoding](alice, example_images(count), fields)

    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}" == job["links"]["self"]
    assert job["id"].startswith("j_")
    assert job["status"] in ("queued", "running", "succeeded")
    assert (job["task"], job["adapter"], job["image_count"]) == (task, adapter, count)
    assert (job["instruction"], job["steps"], job["output_format"]) == (instruction, 4, output_format)
    assert job["guidance"] == 3.5
    assert job["links"] == {"self": f"/v1/jobs/{job['id']}", "result": f"/v1/jobs/{job['id']}/result"}
    assert job["seed"] == (fields["seed"] if seeded else None)
    assert job["error"] is None and job["result"] is None
    parse_time(job["created_at"])

    done = wait_for_status(alice, job["id"], watch=service.core)

    assert done["status"] == "succeeded", done["error"]
    assert (done["task"], done["adapter"], done["image_count"]) == (task, adapter, count)
    assert done["attempts"] == 1 and done["queue_position"] is None and done["error"] is None
    if seeded:
        assert done["seed"] == fields["seed"]
    else:
        assert isinstance(done["seed"], int) and 0 <= done["seed"] <= 2**53 - 1
    # The translator runs with 8 new tokens, too few for a usable answer, so it mostly falls back to
    # the instruction; either way the three fields must agree.
    assert isinstance(done["translated"], bool)
    assert done["prompt"]
    if done["translated"]:
        assert done["fallback_reason"] is None
    else:
        assert done["prompt"] == instruction
        assert done["fallback_reason"] in ("unparseable", "empty", "truncated")
    assert done["progress"] == {"stage": "decode", "step": 1, "total": 1}
    created, started, finished = (parse_time(done[k]) for k in ("created_at", "started_at", "finished_at"))
    assert created <= started <= finished
    assert TIMING_STAGES <= set(done["timings"])
    assert all(seconds >= 0 for seconds in done["timings"].values())
    assert done["timings"]["total"] >= done["timings"]["denoise"]
    assert done["result"]["url"] == done["links"]["result"]
    assert done["result"]["content_type"] == f"image/{output_format}"
    width, height = done["result"]["width"], done["result"]["height"]
    # An edit keeps the aspect of image 1 (96x64); a generation without a size is square.
    assert width > height if task == "edit" else width == height

    image = download(alice, done)

    assert image.format == PIL_FORMATS[output_format]


def test_generate_honours_the_requested_aspect(service: Service, alice: httpx.Client) -> None:
    fields = {"instruction": "A wide beach", "width": 128, "height": 64, "steps": 2, "seed": 3}
    response = submit_json(alice, [], fields, headers={"Prefer": "wait=30"})

    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded" and job["adapter"] == "base"
    assert job["result"]["width"] > job["result"]["height"]
    assert download(alice, job).size == (job["result"]["width"], job["result"]["height"])


def test_several_images_are_stored_and_served_by_index(service: Service, alice: httpx.Client) -> None:
    fields = {"instruction": "A red kite", "num_images": 2, "seed": 41, "steps": 2, "translate": "false"}
    response = submit_json(alice, [], fields, headers={"Prefer": "wait=60"})

    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded" and job["num_images"] == 2 and job["seed"] == 41
    assert [result["seed"] for result in job["results"]] == [41, 42]
    assert [result["url"] for result in job["results"]] == [
        f"/v1/jobs/{job['id']}/result",
        f"/v1/jobs/{job['id']}/result?index=1",
    ]
    assert all(result["signed_url"] for result in job["results"])
    first, second = (alice.get(f"/v1/jobs/{job['id']}/result?index={n}") for n in (0, 1))
    assert first.status_code == second.status_code == 200
    assert first.content != second.content  # two seeds, two images
    assert alice.get(f"/v1/jobs/{job['id']}/result?index=2").json()["error"]["code"] == "result_index"
    # Image 1 is the image a one-image job with the next seed gives.
    alone = submit_json(alice, [], {**fields, "num_images": 1, "seed": 42}, headers={"Prefer": "wait=60"})
    assert alice.get(alone.json()["result"]["url"]).content == second.content


def test_translate_false_samples_with_the_instruction(service: Service, alice: httpx.Client) -> None:
    instruction = "Make image 1 look like a watercolour."
    fields = {"instruction": instruction, "translate": "false", "steps": 2}
    response = submit_multipart(alice, example_images(1), fields, headers={"Prefer": "wait=30"})

    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded"
    assert (job["prompt"], job["translated"], job["fallback_reason"]) == (
        instruction,
        False,
        "disabled_by_request",
    )
    assert job["task"] == "edit"  # left out: edit, since an image was sent


def test_prefer_wait_returns_the_finished_job(service: Service, alice: httpx.Client) -> None:
    response = submit_json(
        alice, [], {"instruction": "A lighthouse", "steps": 2}, headers={"Prefer": "wait=30"}
    )

    assert response.status_code == 200, response.text
    assert response.headers["preference-applied"] == "wait=30"
    job = response.json()
    assert response.headers["location"] == job["links"]["self"]
    assert job["status"] == "succeeded" and job["result"] is not None
    download(alice, job)


def test_prefer_wait_is_capped(service: Service, alice: httpx.Client) -> None:
    response = submit_json(
        alice, [], {"instruction": "A lighthouse", "steps": 2}, headers={"Prefer": "wait=3600"}
    )

    assert response.status_code == 200, response.text
    assert response.headers["preference-applied"] == "wait=60"


def test_prefer_wait_times_out_with_202(service: Service, alice: httpx.Client) -> None:
    started = time.monotonic()
    response = submit_json(
        alice, [], {"instruction": "A long one", "steps": LONG_STEPS // 2}, headers={"Prefer": "wait=1"}
    )
    elapsed = time.monotonic() - started

    assert response.status_code == 202, response.text
    assert response.headers["preference-applied"] == "wait=1"
    job = response.json()
    assert job["status"] in ("queued", "running")
    assert 1.0 <= elapsed < 10
    result = alice.get(job["links"]["result"])
    assert result.status_code == 409
    assert result.json()["error"]["code"] == "job_not_finished"


def test_queued_jobs_report_their_position(service: Service, alice: httpx.Client) -> None:
    long = submit_json(alice, [], {"instruction": "Keep the worker busy", "steps": LONG_STEPS // 2})
    assert long.status_code == 202, long.text
    waiting = []
    for n in range(3):
        response = submit_json(alice, [], {"instruction": f"Job {n}", "steps": 2})
        assert response.status_code == 202, response.text
        waiting.append(response.json()["id"])

    jobs = [get_job(alice, job_id) for job_id in waiting]
    depth = alice.get("/readyz").json()["queue_depth"]

    # The one worker is busy with the long job, so the three wait in order behind it.
    assert [job["status"] for job in jobs] == ["queued"] * 3
    positions = [job["queue_position"] for job in jobs]
    assert positions[0] >= 1
    assert positions == list(range(positions[0], positions[0] + 3))
    assert depth >= 3
    assert alice.get(f"/v1/jobs/{waiting[-1]}/result").json()["error"]["code"] == "job_not_finished"
    for job_id in [long.json()["id"], *waiting]:
        done = wait_for_status(alice, job_id, watch=service.core)
        assert done["status"] == "succeeded", done["error"]
        assert done["queue_position"] is None

"""The text tasks at the gateway: a judge takes one image more than an edit (its output, last), what a
text task does not take is a 422 naming it, and a deployment without the language model says so."""

from __future__ import annotations

import pytest

from tests.app.conftest import Gateway, data_uri, form, png

pytestmark = pytest.mark.anyio

MAX_IMAGES = 2


@pytest.mark.settings(limits={"max_images": MAX_IMAGES})
async def test_a_judge_takes_the_inputs_and_the_output_an_edit_does_not(gateway: Gateway):
    client = gateway.client()
    images = [("images", (f"{n}.png", png(color=(n, 2, 3)), "image/png")) for n in range(MAX_IMAGES + 1)]
    judge = await client.post("/v1/jobs", data={"task": "judge", "instruction": "make it red"}, files=images)
    assert judge.status_code == 202, judge.text
    job = judge.json()
    assert (job["task"], job["image_count"], job["steps"], job["adapter"]) == ("judge", 3, 0, "base")
    assert job["output"] is None and job["result"] is None

    edit = await client.post("/v1/jobs", data={"task": "edit", "instruction": "make it red"}, files=images)
    assert edit.status_code == 422 and edit.json()["error"]["code"] == "too_many_images"
    more = [*images, ("images", ("x.png", png(), "image/png"))]
    judge = await client.post("/v1/jobs", data={"task": "judge", "instruction": "make it red"}, files=more)
    error = judge.json()["error"]
    assert judge.status_code == 422 and error["code"] == "too_many_images", error
    assert "task=judge: 3, the inputs then the output to judge" in error["message"]


async def test_prompt_pairs_are_a_job_with_an_attribute_and_a_count(gateway: Gateway):
    response = await gateway.client().post(
        "/v1/jobs", json={"task": "mixing_prompts", "attribute": "rattan weave", "count": 3}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["task"], job["attribute"], job["count"], job["image_count"]) == (
        "mixing_prompts",
        "rattan weave",
        3,
        0,
    )


IMAGE = data_uri(png())


@pytest.mark.parametrize(
    ("body", "code", "named"),
    [
        ({"task": "judge", "instruction": "x", "images": [IMAGE], "steps": 4}, "field_not_for_task", "steps"),
        ({"task": "judge", "instruction": "x", "images": [IMAGE], "num_images": 2}, "field_not_for_task",
         "num_images"),
        ({"task": "judge", "instruction": "x"}, "judge_needs_output", "output image"),
        ({"task": "mixing_prompts", "attribute": "wool", "images": [IMAGE]}, "field_not_for_task",
         "no images"),
        ({"task": "mixing_prompts", "attribute": "wool", "seed": 3}, "field_not_for_task", "seed"),
        ({"task": "mixing_prompts", "attribute": " \u200b"}, "empty_attribute", "rattan weave"),
        ({"task": "mixing_prompts", "attribute": "wool", "count": 0}, "invalid_count", "between 1 and 8"),
        ({"task": "mixing_prompts", "attribute": "wool", "count": 9}, "invalid_count", "between 1 and 8"),
        ({"task": "mixing_prompts", "attribute": "wool", "count": 1e300}, "invalid_request", "count"),
        ({"task": "mixing_prompts", "attribute": "wool", "count": "many"}, "invalid_request", "count"),
        ({"task": "generate", "instruction": "a cat", "count": 2}, "field_not_for_task", "count"),
    ],
)  # fmt: skip
async def test_what_a_text_task_does_not_take_is_refused_by_name(
    gateway: Gateway, body: dict, code: str, named: str
):
    response = await gateway.client().post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code and named in error["message"], error


async def test_a_multipart_count_is_read_like_a_json_one(gateway: Gateway):
    client = gateway.client()
    bad = await client.post(
        "/v1/jobs", **form({"task": "mixing_prompts", "attribute": "wool", "count": "NaN"})
    )
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
    good = await client.post(
        "/v1/jobs", **form({"task": "mixing_prompts", "attribute": "wool", "count": "2"})
    )
    assert good.status_code == 202 and good.json()["count"] == 2


async def test_text_tasks_are_refused_once_the_workers_say_they_have_no_language_model(gateway: Gateway):
    client = gateway.client()
    workers = gateway.service.store.workers
    body = {"task": "mixing_prompts", "attribute": "wool"}
    # No worker has reported yet: nothing is known, the job is queued (a worker without the model
    # would fail it with the same code).
    assert (await client.post("/v1/jobs", json=body)).status_code == 202
    workers.announce("w-starting", {"name": "w-starting", "ready": False}, 30)
    workers.announce("w-bare", {"name": "w-bare", "ready": True, "translator": False}, 30)
    refused = await client.post("/v1/jobs", json=body)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "translator_unavailable"
    assert "DREAMOMNI2_TRANSLATOR=false" in refused.json()["error"]["message"]
    # Image jobs are not the language model's: they still go.
    assert (await client.post("/v1/jobs", json={"instruction": "a cat"})).status_code == 202
    workers.announce("w-full", {"name": "w-full", "ready": True, "translator": True}, 30)
    assert (await client.post("/v1/jobs", json=body)).status_code == 202
    for name in ("w-starting", "w-bare", "w-full"):
        workers.retire(name)

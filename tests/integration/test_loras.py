"""Registered LoRAs through the real stack: listed by /v1/service, refused by the gateway with 422s,
run by the worker and recorded with the job."""

from __future__ import annotations

import json

import pytest

from .support import assert_error, example_images, submit_json, submit_multipart, wait_for_job


def test_the_service_lists_the_registered_loras(alice):
    info = alice.get("/v1/service").json()
    assert {lora["name"]: (lora["scale"], lora["tasks"]) for lora in info["loras"]} == {
        "comfy": (1.0, ["edit", "generate", "feature_mixing"]),
        "kohya": (0.5, ["edit"]),
        "style": (1.0, ["edit", "generate"]),
    }
    assert info["max_loras_per_job"] == 3 and info["max_lora_scale"] == 4.0
    assert "path" not in json.dumps(info["loras"])  # the files stay the operator's


@pytest.mark.parametrize(
    ("loras", "images", "code"),
    [
        ([{"name": "nope"}], 1, "unknown_lora"),
        ([{"name": "kohya"}], 0, "lora_not_for_task"),
        ([{"name": "style", "scale": 7}], 1, "invalid_lora_scale"),
        ([{"name": "style"}, {"name": "style"}], 1, "duplicate_lora"),
    ],
)
def test_the_gateway_refuses_bad_loras(alice, loras, images, code):
    fields = {"instruction": "x", "loras": loras, "steps": 1}
    error = assert_error(submit_json(alice, example_images(images), fields), 422, code)
    assert error["details"]["field"] == "loras"


def test_a_job_with_loras_records_them(alice):
    fields = {"instruction": "x", "steps": 2, "seed": 3, "translate": "false",
              "loras": json.dumps([{"name": "kohya"}, {"name": "style", "scale": 0.25}])}  # fmt: skip
    response = submit_multipart(alice, example_images(2), fields)
    assert response.status_code == 202, response.text
    job = wait_for_job(alice, response.json()["id"], lambda j: j["status"] in ("succeeded", "failed"))
    assert job["status"] == "succeeded", job
    assert job["loras"] == [{"name": "kohya", "scale": 0.5}, {"name": "style", "scale": 0.25}]

"""Submissions: multipart and JSON bodies, checked by one model, refused with codes a caller can act on."""

from __future__ import annotations

import pytest
from celery import Celery

from tests.app.conftest import Gateway, data_uri, form, png

pytestmark = pytest.mark.anyio


async def test_multipart_and_json_make_the_same_job(gateway: Gateway):
    client = gateway.client()
    form = {"instruction": "make the bag in image 1 use the pattern of image 2", "seed": "7", "steps": "3"}
    files = [
        ("images", ("a.png", png(), "image/png")),
        ("images", ("b.png", png(color=(1, 2, 3)), "image/png")),
    ]
    multipart = await client.post("/v1/jobs", data=form, files=files)
    assert multipart.status_code == 202, multipart.text
    body = {**form, "seed": 7, "steps": 3, "images": [data_uri(png()), data_uri(png(color=(1, 2, 3)))]}
    json_job = await client.post("/v1/jobs", json=body)
    assert json_job.status_code == 202, json_job.text
    a, b = multipart.json(), json_job.json()
    for field in (
        "task",
        "adapter",
        "image_count",
        "instruction",
        "seed",
        "steps",
        "guidance",
        "output_format",
    ):
        assert a[field] == b[field], field
    assert (a["task"], a["adapter"], a["image_count"]) == ("edit", "edit", 2)
    assert multipart.headers["location"] == f"/v1/jobs/{a['id']}"


async def test_the_same_idempotency_key_replays_across_encodings(gateway: Gateway):
    client = gateway.client()
    headers = {"Idempotency-Key": "order-1"}
    request = form({"instruction": "a red bag"})
    first = await client.post(
        "/v1/jobs", content=request["content"], headers={**request["headers"], **headers}
    )
    again = await client.post("/v1/jobs", json={"instruction": "a red bag"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = await client.post("/v1/jobs", json={"instruction": "a blue bag"}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


async def test_empty_form_fields_mean_not_set(gateway: Gateway):
    # Browsers send blank inputs as empty fields.
    response = await gateway.client().post(
        "/v1/jobs", **form({"instruction": "a cat", "seed": "", "steps": "", "webhook_url": ""})
    )
    assert response.status_code == 202, response.text
    assert response.json()["steps"] == 30


@pytest.mark.parametrize(
    ("data", "files", "code", "words"),
    [
        ({"instruction": "x"}, [("seed", ("s.txt", b"1", "text/plain"))], "invalid_request", "Unexpected"),
        ({"instruction": "x", "steps": "abc"}, None, "invalid_request", "steps"),
        ({"steps": "3"}, None, "empty_instruction", "instruction"),
        ({"instruction": "x", "task": "paint"}, None, "invalid_request", "task"),
        ({"instruction": "x", "guidance": "nan"}, None, "invalid_request", "finite"),
        ({"instruction": "x", "guidance": "inf"}, None, "invalid_request", "finite"),
        ({"instruction": "x", "task": "edit"}, None, "edit_needs_image", "image 1"),
        ({"instruction": "x", "webhook_events": "started"}, None, "invalid_request", "webhook_url"),
        ({"instruction": "x"}, [("images", ("a.png", b"", "image/png"))], "invalid_image", "empty"),
        ({"instruction": "x"}, [("images", ("a.png", b"nope", "image/png"))], "invalid_image", "image 1"),
    ],
    ids=["file-in-a-field", "bad-number", "no-instruction", "bad-task", "nan", "inf", "edit-without-image",
         "events-without-url", "empty-image", "not-an-image"],
)  # fmt: skip
async def test_bad_multipart_fields_are_422_with_a_code(gateway: Gateway, data, files, code, words):
    client = gateway.client()
    response = await (
        client.post("/v1/jobs", **form(data))
        if files is None
        else client.post("/v1/jobs", data=data, files=files)
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"]


async def test_a_field_sent_twice_is_refused(gateway: Gateway):
    body = b'--b\r\nContent-Disposition: form-data; name="instruction"\r\n\r\nx\r\n' * 2 + b"--b--\r\n"
    response = await gateway.client().post(
        "/v1/jobs", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 422 and "more than once" in response.json()["error"]["message"]


async def test_a_truncated_multipart_body_is_422(gateway: Gateway):
    body = b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n' + png()[:40]
    response = await gateway.client().post(
        "/v1/jobs", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 422, response.text


async def test_too_many_images_either_way(gateway: Gateway):
    client = gateway.client()
    files = [("images", (f"{n}.png", png(), "image/png")) for n in range(6)]
    multipart = await client.post("/v1/jobs", data={"instruction": "x"}, files=files)
    as_json = await client.post("/v1/jobs", json={"instruction": "x", "images": [data_uri(png())] * 6})
    for response in (multipart, as_json):
        assert response.status_code == 422 and response.json()["error"]["code"] == "too_many_images"
        assert response.json()["error"]["details"] == {"images": 6, "max": 5}


@pytest.mark.parametrize(
    ("images", "code"),
    [(["https://example.com/a.png"], "invalid_image"), (["data:image/png;base64,@@@"], "invalid_image")],
)
async def test_bad_data_uris(gateway: Gateway, images, code):
    response = await gateway.client().post("/v1/jobs", json={"instruction": "x", "images": images})
    assert response.status_code == 422 and response.json()["error"]["code"] == code


async def test_unknown_json_members_and_other_media_types(gateway: Gateway):
    client = gateway.client()
    extra = await client.post("/v1/jobs", json={"instruction": "x", "colour": "red"})
    assert extra.status_code == 422 and "colour" in extra.json()["error"]["message"]
    text = await client.post("/v1/jobs", content=b"instruction=x", headers={"content-type": "text/plain"})
    assert text.status_code == 415 and text.json()["error"]["code"] == "unsupported_media_type"
    broken = await client.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["error"]["code"] == "invalid_request"


@pytest.mark.settings(max_request_bytes=10_000)
async def test_a_body_over_the_limit_is_413_declared_or_streamed(gateway: Gateway):
    client = gateway.client()
    big = await client.post("/v1/jobs", **form({"instruction": "x" * 20_000}))
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"

    async def chunks():
        for _ in range(20):
            yield b"x" * 1000

    streamed = await client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


async def test_an_image_over_the_byte_limit_is_413(gateway: Gateway):
    gateway.service.limits.max_image_bytes = 100
    response = await gateway.client().post(
        "/v1/jobs", data={"instruction": "x"}, files=[("images", ("a.png", png(64, 64), "image/png"))]
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "image_file_too_large"


async def test_webhooks_are_checked_at_submit(gateway: Gateway):
    client = gateway.client()
    refused = await client.post("/v1/jobs", json={"instruction": "x", "webhook_url": "http://127.0.0.1/hook"})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "webhook_url_refused"
    not_http = await client.post("/v1/jobs", json={"instruction": "x", "webhook_url": "ftp://example.com/"})
    assert not_http.status_code == 422 and not_http.json()["error"]["code"] == "webhook_url_refused"


@pytest.mark.settings(webhook_secret="")
async def test_webhooks_without_a_secret_are_unavailable(gateway: Gateway):
    response = await gateway.client().post(
        "/v1/jobs", json={"instruction": "x", "webhook_url": "https://example.com/hook"}
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "webhooks_unavailable"


async def test_step_cache_is_a_request_field_checked_at_submit(gateway: Gateway):
    client = gateway.client()
    ok = await client.post("/v1/jobs", json={"instruction": "a cat", "step_cache": "first_block"})
    assert ok.status_code == 202 and ok.json()["step_cache"] == "first_block"
    default = await client.post("/v1/jobs", json={"instruction": "a cat"})
    assert default.json()["step_cache"] == "none"
    unknown = await client.post("/v1/jobs", json={"instruction": "a cat", "step_cache": "magic"})
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "invalid_request"


@pytest.mark.settings(limits={"step_caches": ["first_block"]})
async def test_a_step_cache_the_deployment_leaves_out_is_422(gateway: Gateway):
    response = await gateway.client().post(
        "/v1/jobs", json={"instruction": "a cat", "step_cache": "taylorseer"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "step_cache_not_allowed"
    assert response.json()["error"]["details"]["allowed"] == ["none", "first_block"]


@pytest.mark.parametrize("cut", ["inside image 2", "after image 2", "inside a field"])
async def test_a_body_cut_off_anywhere_is_refused_and_makes_no_job(gateway: Gateway, cut: str):
    head = b'--b\r\nContent-Disposition: form-data; name="%s"; filename="%d.png"\r\n'
    head += b"Content-Type: image/png\r\n\r\n"
    body = b'--b\r\nContent-Disposition: form-data; name="instruction"\r\n\r\nmake it blue\r\n'
    body += head % (b"images", 1) + png() + b"\r\n"
    body += {
        "inside image 2": head % (b"images", 2) + png()[:50],
        "after image 2": head % (b"images", 2) + png() + b"\r\n",  # no closing boundary
        "inside a field": b'--b\r\nContent-Disposition: form-data; name="steps"\r\n\r\n1',
    }[cut]
    response = await gateway.client().post(
        "/v1/jobs", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert gateway.service.store.jobs.queue_depth() == 0


async def test_a_hundred_image_parts_are_too_many_images_not_a_parser_400(gateway: Gateway):
    files = [("images", (f"{n}.png", b"x", "image/png")) for n in range(101)]
    response = await gateway.client().post("/v1/jobs", data={"instruction": "x"}, files=files)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "too_many_images" and "at most 5 images" in error["message"]


async def test_multipart_without_a_boundary_is_422(gateway: Gateway):
    response = await gateway.client().post(
        "/v1/jobs", content=b"abc", headers={"content-type": "multipart/form-data"}
    )
    assert response.status_code == 422, response.text
    assert "boundary" in response.json()["error"]["message"]


async def test_a_job_stored_but_not_sent_is_answered_with_the_job_not_a_5xx(gateway: Gateway):
    # The broker unreachable right after the job was stored: a 5xx now would make a retrying client
    # create a duplicate. The answer is the job; a worker's reaper sends its message later.
    unreachable = Celery("unreachable", broker="redis://127.0.0.1:1/0")
    unreachable.conf.update(
        task_publish_retry=False, broker_connection_timeout=1, broker_connection_retry=False
    )
    gateway.service.celery = unreachable
    response = await gateway.client().post(
        "/v1/jobs", json={"instruction": "a cat"}, headers={"Prefer": "wait=1"}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and gateway.service.store.jobs.queued_ids() == [job["id"]]


async def test_a_feature_mixing_job_is_queued_with_its_prompts_and_defaults(gateway: Gateway):
    client = gateway.client()
    body = {"source_prompt": "a leather bag on a table", "target_prompt": "a sofa", "attribute": "material"}
    response = await client.post("/v1/jobs", json={**body, "seed": 3, "steps": 2})
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["task"], job["adapter"], job["image_count"], job["instruction"]) == (
        "feature_mixing", "base", 0, None
    )  # fmt: skip
    assert {k: job[k] for k in body} == body
    assert job["mixing"] == {"blocks": "all", "step_fraction": 1.0, "strength": 1.0}
    multipart = await client.post(
        "/v1/jobs", **form({**body, "task": "feature_mixing", "mix_blocks": "double", "mix_steps": "0.25"})
    )
    assert multipart.status_code == 202, multipart.text
    assert multipart.json()["mixing"]["blocks"] == "double"
    assert multipart.json()["mixing"]["step_fraction"] == 0.25


#: A Feature Mixing pair's prompts, and the same with the task named.
PAIR = {"source_prompt": "a", "target_prompt": "b"}
MIX = {"task": "feature_mixing", **PAIR}


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({"task": "feature_mixing", "source_prompt": "a bag"}, "mixing_needs_prompts", "target_prompt"),
        ({**MIX, "target_prompt": "\u200b"}, "mixing_needs_prompts", "target"),
        ({**PAIR, "images": [data_uri(png())]}, "mixing_field_without_mixing", "source_prompt"),
        ({**MIX, "images": [data_uri(png())]}, "mixing_takes_no_images", "no images"),
        ({**MIX, "instruction": "x"}, "mixing_field_without_mixing", "instruction"),
        ({"instruction": "a cat", "mix_strength": 0.5}, "mixing_field_without_mixing", "mix_strength"),
        ({**PAIR, "mix_steps": 1.5}, "invalid_mix_steps", "between 0.0 and 1.0"),
        ({**PAIR, "mix_strength": -0.1}, "invalid_mix_strength", "mix_strength"),
        ({**PAIR, "mix_blocks": "some"}, "invalid_request", "mix_blocks"),
        ({**PAIR, "step_cache": "first_block"}, "step_cache_not_allowed", "feature_mixing"),
        ({"source_prompt": "a" * 2001, "target_prompt": "b"}, "prompt_too_long", "source_prompt"),
    ],
    ids=["no-target", "invisible-target", "with-images-no-task", "with-images", "with-instruction",
         "mixing-field-on-generate", "mix-steps", "mix-strength", "mix-blocks", "step-cache", "too-long"],
)  # fmt: skip
async def test_a_bad_feature_mixing_request_is_422_with_a_code(gateway: Gateway, body, code, words):
    response = await gateway.client().post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"], error


async def test_num_images_is_queued_and_reported(gateway: Gateway):
    client = gateway.client()
    several = await client.post("/v1/jobs", json={"instruction": "a cat", "num_images": 3, "seed": 5})
    assert several.status_code == 202, several.text
    assert several.json()["num_images"] == 3 and several.json()["seed"] == 5
    multipart = await client.post("/v1/jobs", **form({"instruction": "a cat", "num_images": "2"}))
    assert multipart.status_code == 202 and multipart.json()["num_images"] == 2
    default = await client.post("/v1/jobs", json={"instruction": "a cat"})
    assert default.json()["num_images"] == 1
    info = await client.get("/v1/service")
    assert info.json()["max_num_images"] == 4


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({"num_images": 0}, "invalid_num_images", "between 1 and 4"),
        ({"num_images": 5}, "invalid_num_images", "between 1 and 4"),
        ({"num_images": -1}, "invalid_num_images", "num_images"),
        ({"num_images": 2.5}, "invalid_request", "num_images"),
        ({"num_images": "two"}, "invalid_request", "num_images"),
        ({"num_images": "nan"}, "invalid_request", "num_images"),
        ({"num_images": "inf"}, "invalid_request", "num_images"),
        ({"num_images": 10**30}, "invalid_num_images", "num_images"),
        ({"num_images": 2, "seed": 2**53 - 1}, "invalid_seed", "seed"),
        ({"num_images": 2, "instruction": None, "source_prompt": "a", "target_prompt": "b"},
         "invalid_num_images", "feature_mixing"),
    ],
    ids=["zero", "above-cap", "negative", "fraction", "text", "nan", "inf", "huge", "last-seed-too-big",
         "with-mixing"],
)  # fmt: skip
async def test_bad_num_images_is_422_and_makes_no_job(gateway: Gateway, body, code, words):
    body = {"instruction": "a cat", **body}
    response = await gateway.client().post("/v1/jobs", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"], error
    assert gateway.service.store.jobs.queue_depth() == 0


@pytest.mark.settings(limits={"max_num_images": 2})
async def test_the_num_images_cap_is_the_deployments(gateway: Gateway):
    response = await gateway.client().post("/v1/jobs", json={"instruction": "a cat", "num_images": 3})
    assert response.status_code == 422
    assert response.json()["error"]["details"] == {"field": "num_images", "value": 3, "min": 1, "max": 2}

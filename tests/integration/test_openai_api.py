"""The OpenAI-compatible routes through the official `openai` SDK, against the main stack (keys on)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from app.stack import LocalStack, free_port

from .conftest import Service
from .support import MAX_STEPS, get_job, is_denoising, png_bytes, submit_json, wait_until

PROMPT = "make the bag in image 1 use the colour of image 2"


@pytest.fixture
def sdk(service: Service) -> OpenAI:
    """The SDK with alice's key; no retries, so every refusal is seen once."""
    return OpenAI(
        base_url=f"{service.stack.url}/v1", api_key=service.keys["alice"], max_retries=0, timeout=120
    )


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_models(sdk: OpenAI):
    assert [model.id for model in sdk.models.list()] == ["dreamomni2"]
    assert sdk.models.retrieve("dreamomni2").id == "dreamomni2"
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.models.retrieve("gpt-image-1")
    assert raised.value.code == "model_not_found"


def test_edit_with_two_images_b64(sdk: OpenAI):
    images = [
        ("a.png", png_bytes(64, 48), "image/png"),
        ("b.png", png_bytes(32, 32, (0, 0, 255)), "image/png"),
    ]
    answer = sdk.images.edit(model="dreamomni2", image=images, prompt=PROMPT, n=2, response_format="b64_json")
    assert len(answer.data) == 2
    pictures = [decoded(image.b64_json) for image in answer.data]
    assert {picture.format for picture in pictures} == {"PNG"}
    assert answer.size == f"{pictures[0].width}x{pictures[0].height}"
    assert pictures[0].tobytes() != pictures[1].tobytes()  # seeds seed and seed + 1
    assert all(image.revised_prompt for image in answer.data)


def test_generate_url_and_jpeg(sdk: OpenAI):
    answer = sdk.images.generate(
        prompt="A red bag", response_format="url", output_format="jpeg", size="64x64"
    )
    assert answer.output_format == "jpeg"
    url = answer.data[0].url
    assert url and "signature=" in url
    fetched = httpx.get(url)  # a signed link: no key needed
    assert fetched.status_code == 200
    assert Image.open(io.BytesIO(fetched.content)).format == "JPEG"


def test_generate_job_is_visible(sdk: OpenAI, alice: httpx.Client):
    raw = sdk.images.with_raw_response.generate(prompt="A blue bag")
    job_id = raw.headers["x-job-id"]
    assert get_job(alice, job_id)["status"] == "succeeded"
    assert raw.parse().data[0].b64_json


def test_streaming_with_partial_images(sdk: OpenAI):
    events = list(sdk.images.generate(prompt="A red bag", stream=True, partial_images=2))
    kinds = [event.type for event in events]
    assert kinds[-1] == "image_generation.completed"
    partials = [event for event in events if event.type == "image_generation.partial_image"]
    assert 1 <= len(partials) <= 2
    assert [event.partial_image_index for event in partials] == list(range(len(partials)))
    assert decoded(partials[0].b64_json).format == "JPEG"
    assert decoded(events[-1].b64_json).format == "PNG"


def test_streaming_edit(sdk: OpenAI):
    stream = sdk.images.edit(
        image=("a.png", png_bytes(), "image/png"), prompt=PROMPT, stream=True, partial_images=1
    )
    events = list(stream)
    assert events[-1].type == "image_edit.completed"


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda sdk: sdk.images.generate(prompt="x", size="64by64"), "size"),
        (lambda sdk: sdk.images.generate(prompt="x", size="100000x64"), "size"),
        (lambda sdk: sdk.images.generate(prompt="x", n=5), "n"),
        (lambda sdk: sdk.images.generate(prompt="x", extra_body={"colour": "red"}), "colour"),
        (lambda sdk: sdk.images.generate(prompt="x", output_format="gif"), "output_format"),
        (lambda sdk: sdk.images.generate(prompt="   "), "prompt"),
        (lambda sdk: sdk.images.edit(image=("a.png", b"not an image", "image/png"), prompt="x"), "image"),
        (lambda sdk: sdk.images.edit(image=[("a.png", png_bytes(), "image/png")] * 9, prompt="x"), "image"),
        (
            lambda sdk: sdk.images.edit(image=("a.png", png_bytes(), "image/png"), prompt="x", size="64x64"),
            "size",
        ),
    ],
)
def test_refusals_are_bad_requests(sdk: OpenAI, service: Service, call, param):
    depth = service.store.queue_depth()
    with pytest.raises(openai.BadRequestError) as raised:
        call(sdk)
    body = raised.value.body
    assert set(body) == {"message", "type", "param", "code"}, body
    assert body["type"] == "invalid_request_error"
    if param is not None:
        assert body["param"] == param, body
    assert raised.value.message.endswith(body["message"])
    assert service.store.queue_depth() == depth


@pytest.mark.parametrize("number", ["NaN", "Infinity", "1e999"])
def test_non_finite_numbers_are_refused(alice: httpx.Client, number: str):
    body = '{"prompt": "A red bag", "output_compression": ' + number + "}"
    response = alice.post(
        "/v1/images/generations", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "output_compression"), error


def test_unknown_model(sdk: OpenAI):
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.images.generate(prompt="x", model="dall-e-3")
    assert raised.value.code == "model_not_found"
    assert "dall-e-3" in raised.value.message


def test_auth(service: Service):
    nobody = OpenAI(base_url=f"{service.stack.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        nobody.images.generate(prompt="A red bag")
    assert raised.value.code == "invalid_api_key"
    assert raised.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        nobody.models.list()


# Held calls: timeouts, quotas, client disconnects, failed jobs ------------------------------------------
@pytest.fixture(scope="module")
def strict_gateway(main_stack: LocalStack) -> Iterator[str]:
    """A second gateway on the main stack's Redis that holds a call at most 1 s and lets a key have one
    job queued or running."""
    port = free_port()
    env = {"DREAMOMNI2_MAX_WAIT_S": "1", "DREAMOMNI2_MAX_ACTIVE_JOBS_PER_KEY": "1"}
    gateway = main_stack.start_gateway(port=port, env=env)
    yield f"http://127.0.0.1:{port}"
    gateway.stop()


@pytest.fixture
def busy_worker(service: Service, alice: httpx.Client) -> Iterator[str]:
    """A long native job of alice's, running on the only worker (canceled after the test)."""
    created = submit_json(alice, [], {"instruction": "A red bag", "task": "generate", "steps": MAX_STEPS})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    wait_until(
        lambda: is_denoising(get_job(alice, job_id), 1) or None, timeout=60, what="the long job to run"
    )
    yield job_id
    alice.post(f"/v1/jobs/{job_id}/cancel")


def test_timeout_names_the_job_to_fetch(service: Service, strict_gateway: str, busy_worker: str):
    bob = OpenAI(base_url=f"{strict_gateway}/v1", api_key=service.keys["bob"], max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:
        bob.images.generate(prompt="A red bag")
    assert raised.value.status_code == 408 and raised.value.response.headers["x-should-retry"] == "false"
    assert raised.value.body["type"] == "invalid_request_error" and raised.value.body["code"] == "timeout"
    job_id = raised.value.message.split("Job ")[1].split(" ")[0]
    bob_http = service.client("bob")
    assert get_job(bob_http, job_id)["status"] == "queued"  # it goes on: fetch it later
    bob_http.post(f"/v1/jobs/{job_id}/cancel")


def test_quota_raises_rate_limit_error(service: Service, strict_gateway: str, busy_worker: str):
    alice = OpenAI(base_url=f"{strict_gateway}/v1", api_key=service.keys["alice"], max_retries=0)
    depth = service.store.queue_depth()
    with pytest.raises(openai.RateLimitError) as raised:
        alice.images.generate(prompt="A red bag")
    assert raised.value.code == "rate_limit_exceeded"
    assert "jobs queued or running" in raised.value.message
    assert raised.value.response.headers["retry-after"]
    assert service.store.queue_depth() == depth


def test_a_client_that_goes_away_cancels_its_job(service: Service, busy_worker: str):
    key = service.keys["alice"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{service.stack.url}/v1/images/generations",
            json={"prompt": "A red bag"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=1.5,
        )
    # The worker is still busy with the long job: the call's job left the queue only by its cancel.
    wait_until(
        lambda: service.store.queue_depth() == 0 or None, timeout=10, what="the abandoned job to be canceled"
    )
    assert get_job(service.client("alice"), busy_worker)["status"] == "running"


def test_a_job_that_fails_raises_with_its_reason(service: Service, lax_gateway: str):
    alice = OpenAI(base_url=f"{lax_gateway}/v1", api_key=service.keys["alice"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        alice.images.edit(image=("tiny.png", png_bytes(4, 4), "image/png"), prompt=PROMPT)
    assert raised.value.code == "image_too_small"
    assert "failed" in raised.value.message


def test_a_stream_past_the_cap_ends_with_an_error_naming_the_job(
    service: Service, strict_gateway: str, busy_worker: str
):
    bob = OpenAI(base_url=f"{strict_gateway}/v1", api_key=service.keys["bob"], max_retries=0)
    with pytest.raises(openai.APIError) as raised:
        list(bob.images.generate(prompt="A red bag", stream=True, partial_images=1))
    assert "did not finish within 1 s" in raised.value.message
    job_id = raised.value.message.split("Job ")[1].split(" ")[0]
    bob_http = service.client("bob")
    assert get_job(bob_http, job_id)["status"] == "queued"
    bob_http.post(f"/v1/jobs/{job_id}/cancel")


def test_an_idempotency_key_replays_the_same_job(sdk: OpenAI):
    headers = {"Idempotency-Key": "openai-replay-1"}
    first = sdk.images.with_raw_response.generate(prompt="A green bag", extra_headers=headers)
    again = sdk.images.with_raw_response.generate(prompt="A green bag", extra_headers=headers)
    assert first.headers["x-job-id"] == again.headers["x-job-id"]
    assert first.parse().data[0].b64_json == again.parse().data[0].b64_json


def test_a_stream_that_goes_away_cancels_its_job(service: Service, alice: httpx.Client, busy_worker: str):
    with alice.stream(
        "POST", "/v1/images/generations", json={"prompt": "A red bag", "stream": True}
    ) as stream:
        assert stream.status_code == 200
        job_id = stream.headers["x-job-id"]
        assert get_job(alice, job_id)["status"] == "queued"
    wait_until(
        lambda: get_job(alice, job_id)["status"] == "canceled" or None,
        timeout=10,
        what="the stream's job to cancel",
    )
    assert get_job(alice, busy_worker)["status"] == "running"


def test_loras_as_an_extra_body_field(sdk: OpenAI, alice: httpx.Client):
    # JSON for a generation; for an edit the SDK flattens them into `loras[][name]` / `loras[][scale]`
    # form fields; a form may also carry them as JSON text in one `loras` field.
    raw = sdk.images.with_raw_response.generate(
        prompt="A red bag",
        size="64x64",
        extra_body={"loras": [{"name": "style", "scale": 0.5}, {"name": "comfy"}]},
    )
    assert get_job(alice, raw.headers["x-job-id"])["loras"] == [
        {"name": "style", "scale": 0.5}, {"name": "comfy", "scale": 1.0}
    ]  # fmt: skip
    image = ("a.png", png_bytes(64, 48), "image/png")
    raw = sdk.images.with_raw_response.edit(
        image=image,
        prompt=PROMPT,
        extra_body={"loras": [{"name": "kohya"}, {"name": "style", "scale": -0.5}]},
    )
    assert get_job(alice, raw.headers["x-job-id"])["loras"] == [
        {"name": "kohya", "scale": 0.5}, {"name": "style", "scale": -0.5}
    ]  # fmt: skip
    answer = alice.post(
        "/v1/images/edits", files={"image": image},
        data={"prompt": PROMPT, "loras": '[{"name": "style", "scale": 0.75}]'},
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert get_job(alice, answer.headers["x-job-id"])["loras"] == [{"name": "style", "scale": 0.75}]

    with pytest.raises(openai.BadRequestError) as raised:
        sdk.images.edit(image=image, prompt=PROMPT, extra_body={"loras": [{"name": "nope"}]})
    assert raised.value.code == "unknown_lora"
    assert "No LoRA named 'nope' is registered" in raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.images.generate(prompt="A red bag", extra_body={"loras": [{"name": "kohya"}]})  # edits only
    assert raised.value.code == "lora_not_for_task"

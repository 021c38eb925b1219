"""Every bad request gets its 4xx with the error envelope, and nothing is queued or stored for it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from app.stack import LocalStack, free_port

from .conftest import Service
from .support import (
    MAX_STEPS,
    StoreSnapshot,
    assert_error,
    bomb_png,
    data_uri,
    example_images,
    multipart_parts,
    noise_png,
    png_bytes,
    submit_json,
    wait_for_status,
)

# A second gateway on the main stack's Redis with small byte limits; the main gateway keeps the defaults.
SMALL_IMAGE_BYTES = 4096
SMALL_REQUEST_BYTES = 64 * 1024

IMAGES: dict[str, Callable[[], list[bytes]]] = {
    "none": lambda: [],
    "one": lambda: example_images(1),
    "six": lambda: example_images(6),
    "not_an_image": lambda: [b"this is plain text, not a picture"],
    "zero_bytes": lambda: [b""],
    "truncated": lambda: [png_bytes(64, 64)[:60]],
    "bomb": lambda: [bomb_png()],
    "second_is_bomb": lambda: [png_bytes(), bomb_png()],
    "too_small": lambda: [png_bytes(8, 8)],
    "too_thin": lambda: [png_bytes(400, 20)],
}

OK = {"instruction": "Make it blue"}

MULTIPART_CASES = [
    ("six", OK, 422, "too_many_images"),
    ("not_an_image", OK, 422, "invalid_image"),
    ("zero_bytes", OK, 422, "invalid_image"),
    ("truncated", OK, 422, "invalid_image"),
    ("bomb", OK, 422, "image_too_large"),
    ("second_is_bomb", OK, 422, "image_too_large"),
    ("too_small", OK, 422, "image_too_small"),
    ("too_thin", OK, 422, "image_aspect_ratio"),
    ("one", {"instruction": ""}, 422, "empty_instruction"),
    ("one", {"instruction": "   \n "}, 422, "empty_instruction"),
    ("one", {"instruction": "\u200b\u200c\u200d\ufeff\u2060"}, 422, "empty_instruction"),  # zero-width only
    ("one", {"instruction": " \u3164\u2800 "}, 422, "empty_instruction"),  # blank letters only
    ("one", {}, 422, "empty_instruction"),  # no instruction (and no Feature Mixing prompts)
    ("one", {"instruction": "x" * 2001}, 422, "instruction_too_long"),
    ("one", {**OK, "steps": "0"}, 422, "invalid_steps"),
    ("one", {**OK, "steps": str(MAX_STEPS + 1)}, 422, "invalid_steps"),
    ("one", {**OK, "steps": "many"}, 422, "invalid_request"),
    ("one", {**OK, "guidance": "-0.5"}, 422, "invalid_guidance"),
    ("one", {**OK, "guidance": "30.5"}, 422, "invalid_guidance"),
    ("one", {**OK, "seed": "-1"}, 422, "invalid_seed"),
    # Beyond 2^53-1 a browser's JSON reads another number: the seed would not reproduce the image.
    ("one", {**OK, "seed": str(2**53)}, 422, "invalid_seed"),
    ("none", {**OK, "width": "32"}, 422, "invalid_width"),
    ("none", {**OK, "width": "5000"}, 422, "invalid_width"),
    ("none", {**OK, "height": "8192"}, 422, "invalid_height"),
    ("none", {**OK, "width": "4096", "height": "256"}, 422, "invalid_size"),
    ("one", {**OK, "width": "512"}, 422, "size_with_edit"),
    ("one", {**OK, "task": "edit", "height": "512"}, 422, "size_with_edit"),
    ("none", {**OK, "task": "edit"}, 422, "edit_needs_image"),
    ("one", {**OK, "task": "paint"}, 422, "invalid_request"),
    ("one", {**OK, "output_format": "gif"}, 422, "invalid_request"),
    ("one", {**OK, "strength": "0.8"}, 422, "invalid_request"),
]


def json_body(**fields: Any) -> dict[str, Any]:
    return {"images": [data_uri(png_bytes())], "instruction": "Make it blue", **fields}


JSON_CASES: list[tuple[str, Callable[[], dict[str, Any] | bytes], int, str]] = [
    (
        "six_images",
        lambda: json_body(images=[data_uri(i) for i in example_images(6)]),
        422,
        "too_many_images",
    ),
    ("malformed", lambda: b'{"instruction": "Make it blue", ', 422, "invalid_request"),
    ("not_an_object", lambda: b"[]", 422, "invalid_request"),
    ("unknown_field", lambda: json_body(strength=0.8), 422, "invalid_request"),
    ("instruction_missing", lambda: {"images": []}, 422, "empty_instruction"),
    ("instruction_not_text", lambda: json_body(instruction=12), 422, "invalid_request"),
    ("images_not_a_list", lambda: json_body(images=data_uri(png_bytes())), 422, "invalid_request"),
    ("empty_instruction", lambda: json_body(instruction=""), 422, "empty_instruction"),
    ("instruction_too_long", lambda: json_body(instruction="y" * 2001), 422, "instruction_too_long"),
    ("steps_zero", lambda: json_body(steps=0), 422, "invalid_steps"),
    ("steps_too_many", lambda: json_body(steps=MAX_STEPS + 1), 422, "invalid_steps"),
    ("guidance_high", lambda: json_body(guidance=31), 422, "invalid_guidance"),
    ("width_small", lambda: json_body(images=[], width=16), 422, "invalid_width"),
    ("height_large", lambda: json_body(images=[], height=4097), 422, "invalid_height"),
    ("width_with_edit", lambda: json_body(width=512), 422, "size_with_edit"),
    ("edit_without_image", lambda: json_body(images=[], task="edit"), 422, "edit_needs_image"),
    ("bad_output_format", lambda: json_body(output_format="bmp"), 422, "invalid_request"),
    ("not_a_data_uri", lambda: json_body(images=["https://example.com/a.png"]), 422, "invalid_image"),
    ("data_uri_not_base64", lambda: json_body(images=["data:image/png;base64,@@@@"]), 422, "invalid_image"),
    ("data_uri_without_base64", lambda: json_body(images=["data:image/png,abc"]), 422, "invalid_image"),
    ("data_uri_empty", lambda: json_body(images=["data:image/png;base64,"]), 422, "invalid_image"),
    ("data_uri_not_an_image", lambda: json_body(images=[data_uri(b"hello")]), 422, "invalid_image"),
    ("data_uri_bomb", lambda: json_body(images=[data_uri(bomb_png())]), 422, "image_too_large"),
]


@pytest.mark.parametrize(
    ("images", "fields", "status", "code"),
    [pytest.param(*case, id=f"{case[3]}-{n}") for n, case in enumerate(MULTIPART_CASES)],
)
def test_bad_multipart_is_refused_before_queuing(
    service: Service, alice: httpx.Client, images: str, fields: dict[str, str], status: int, code: str
) -> None:
    before = StoreSnapshot.take(service.redis)

    response = alice.post("/v1/jobs", files=multipart_parts(IMAGES[images](), fields))

    assert_error(response, status, code)
    before.assert_unchanged(service.redis)


@pytest.mark.parametrize(
    ("body", "status", "code"), [pytest.param(*case[1:], id=case[0]) for case in JSON_CASES]
)
def test_bad_json_is_refused_before_queuing(
    service: Service, alice: httpx.Client, body: Callable[[], dict[str, Any] | bytes], status: int, code: str
) -> None:
    payload = body()
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    before = StoreSnapshot.take(service.redis)

    response = alice.post("/v1/jobs", content=content, headers={"Content-Type": "application/json"})

    assert_error(response, status, code)
    before.assert_unchanged(service.redis)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "image/png", "application/xml", None]
)
def test_wrong_content_type_is_415(service: Service, alice: httpx.Client, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    before = StoreSnapshot.take(service.redis)

    response = alice.post("/v1/jobs", content=b"instruction=hello", headers=headers)

    assert_error(response, 415, "unsupported_media_type")
    before.assert_unchanged(service.redis)


def test_multipart_form_mistakes_are_refused(service: Service, alice: httpx.Client) -> None:
    before = StoreSnapshot.take(service.redis)
    image = ("a.png", png_bytes(), "image/png")
    wrong_file_field = [("image", image), ("instruction", (None, "Make it blue"))]
    repeated_field = [("images", image), ("instruction", (None, "a")), ("instruction", (None, "b"))]
    text_as_image = [("images", (None, "not a file")), ("instruction", (None, "Make it blue"))]

    for parts in (wrong_file_field, repeated_field, text_as_image):
        assert_error(alice.post("/v1/jobs", files=parts), 422, "invalid_request")

    before.assert_unchanged(service.redis)


# Byte limits ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_limits_gateway(main_stack: LocalStack) -> Iterator[str]:
    """The URL of a gateway with small byte limits, on the main stack's Redis."""
    port = free_port()
    gateway = main_stack.start_gateway(
        port=port,
        env={
            "DREAMOMNI2_MAX_IMAGE_BYTES": str(SMALL_IMAGE_BYTES),
            "DREAMOMNI2_MAX_REQUEST_BYTES": str(SMALL_REQUEST_BYTES),
        },
    )
    yield f"http://127.0.0.1:{port}"
    gateway.stop()


@pytest.fixture
def limited(service: Service, small_limits_gateway: str) -> httpx.Client:
    return service.client("alice", base_url=small_limits_gateway)


def test_small_limits_gateway_still_takes_small_jobs(service: Service, limited: httpx.Client) -> None:
    small = png_bytes(32, 32)
    assert len(small) < SMALL_IMAGE_BYTES
    response = submit_json(limited, [small], {"instruction": "Make it blue", "steps": 2})

    assert response.status_code == 202, response.text
    assert wait_for_status(limited, response.json()["id"], watch=service.core)["status"] == "succeeded"


@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_image_over_its_byte_limit_is_413(service: Service, limited: httpx.Client, encoding: str) -> None:
    large = noise_png(48, 48)
    assert SMALL_IMAGE_BYTES < len(large) < SMALL_REQUEST_BYTES // 2
    before = StoreSnapshot.take(service.redis)

    if encoding == "multipart":
        response = limited.post("/v1/jobs", files=multipart_parts([png_bytes(), large], OK))
    else:
        response = submit_json(limited, [png_bytes(), large], OK)

    error = assert_error(response, 413, "image_file_too_large")
    assert error["details"]["max_bytes"] == SMALL_IMAGE_BYTES
    assert error["details"]["image"] == "image 2"
    before.assert_unchanged(service.redis)


@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_request_over_the_byte_limit_is_413(service: Service, limited: httpx.Client, encoding: str) -> None:
    images = [noise_png(64, 64, seed=n) for n in range(6)]  # about 74 KB together
    before = StoreSnapshot.take(service.redis)

    if encoding == "multipart":
        response = limited.post("/v1/jobs", files=multipart_parts(images, OK))
    else:
        response = submit_json(limited, images, OK)

    assert "content-length" in response.request.headers
    error = assert_error(response, 413, "payload_too_large")
    assert error["details"]["max_bytes"] == SMALL_REQUEST_BYTES
    before.assert_unchanged(service.redis)


def test_chunked_request_over_the_byte_limit_is_413(service: Service, limited: httpx.Client) -> None:
    """No Content-Length to refuse up front: the limit holds while the body streams in."""
    images = [data_uri(noise_png(96, 96, seed=n)) for n in range(3)]
    body = json.dumps({"images": images, "instruction": "Make it blue"}).encode()
    assert len(body) > SMALL_REQUEST_BYTES

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    before = StoreSnapshot.take(service.redis)

    response = limited.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})

    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    error = assert_error(response, 413, "payload_too_large")
    assert error["details"]["max_bytes"] == SMALL_REQUEST_BYTES
    before.assert_unchanged(service.redis)

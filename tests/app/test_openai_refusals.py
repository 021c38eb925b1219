"""The OpenAI surface's translation: native errors into OpenAI's envelope, OpenAI fields into a job."""

from __future__ import annotations

import pytest

from api_schemas.api import ErrorInfo, JobStatus
from api_schemas.common import Task
from api_schemas.errors import (
    ErrorCode,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
)
from api_schemas.openai import ImageRequest
from app.openai_images import OpenAIRefusal, job_failure, refusal_of, to_options


@pytest.mark.parametrize(
    ("error", "status", "type_", "code", "param"),
    [
        (
            InvalidInput("w", code=ErrorCode.INVALID_REQUEST, details={"field": "width"}),
            400,
            "invalid_request_error",
            "invalid_request",
            "size",
        ),
        (
            InvalidInput("e", code=ErrorCode.EMPTY_INSTRUCTION),
            400,
            "invalid_request_error",
            "empty_instruction",
            "prompt",
        ),
        (
            PayloadTooLarge("big", code=ErrorCode.IMAGE_FILE_TOO_LARGE, details={"image": "image 1"}),
            400,
            "invalid_request_error",
            "image_file_too_large",
            "image",
        ),
        (
            Unauthorized("who", code=ErrorCode.INVALID_API_KEY),
            401,
            "invalid_request_error",
            "invalid_api_key",
            None,
        ),
        (
            TooManyRequests("slow", code=ErrorCode.RATE_LIMITED, headers={"Retry-After": "2"}),
            429,
            "rate_limit_error",
            "rate_limit_exceeded",
            None,
        ),
        (NotFound("gone", code=ErrorCode.JOB_NOT_FOUND), 404, "invalid_request_error", "job_not_found", None),
        (ServiceUnavailable("down"), 503, "server_error", "unavailable", None),
    ],
)
def test_native_errors_become_openai_refusals(error, status, type_, code, param):
    refusal = refusal_of(error)
    assert (refusal.status, refusal.type, refusal.code, refusal.param) == (status, type_, code, param)
    assert refusal.body() == {
        "error": {"message": error.message, "type": type_, "param": param, "code": code}
    }


def test_size_maps_to_width_and_height_for_generations():
    options = to_options(ImageRequest(prompt="a bag", size="1024x768", n=2), Task.GENERATE)
    assert (options.width, options.height, options.num_images) == (1024, 768, 2)
    auto = to_options(ImageRequest(prompt="a bag", size="auto"), Task.GENERATE)
    assert (auto.width, auto.height, auto.num_images) == (None, None, None)


@pytest.mark.parametrize(
    ("request_", "task", "param"),
    [
        (ImageRequest(prompt="x", size="big"), Task.GENERATE, "size"),
        (ImageRequest(prompt="x", size="64x64"), Task.EDIT, "size"),
        (ImageRequest(prompt="x", model="dall-e-3"), Task.GENERATE, "model"),
        (ImageRequest(prompt="x", stream=True, response_format="url"), Task.GENERATE, "response_format"),
    ],
)
def test_what_the_native_api_lacks_is_refused(request_, task, param):
    with pytest.raises(OpenAIRefusal) as raised:
        to_options(request_, task)
    assert raised.value.param == param
    assert raised.value.status == (404 if param == "model" else 400)


@pytest.mark.parametrize(
    ("status", "code", "answer", "type_", "retry"),
    [
        (JobStatus.FAILED, "image_too_small", 400, "invalid_request_error", None),
        (JobStatus.FAILED, "out_of_memory", 409, "server_error", "false"),
        (JobStatus.FAILED, "worker_lost", 409, "server_error", "false"),
        (JobStatus.FAILED, "internal", 409, "server_error", "false"),
        (JobStatus.FAILED, "no_such_code", 409, "server_error", "false"),
        (JobStatus.CANCELED, "canceled", 409, "invalid_request_error", None),
    ],
)
def test_a_job_that_ended_without_images_never_answers_a_5xx(status, code, answer, type_, retry):
    # The call created a job: a 5xx would make the SDK send it again, and the GPU run it twice.
    refusal = job_failure("j_1", status, ErrorInfo(code=code, message="it broke"))
    assert (refusal.status, refusal.type) == (answer, type_)
    assert (refusal.headers or {}).get("x-should-retry") == retry
    assert refusal.message.startswith("Job j_1 ")
    if answer == 409 and status is JobStatus.FAILED:
        assert "GET /v1/jobs/j_1" in refusal.message and "it broke" in refusal.message

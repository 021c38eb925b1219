"""The LoRA registry and a request's `loras`: parsed, checked, refused with the right code."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from api_schemas.common import Task
from api_schemas.errors import ErrorCode, InvalidInput
from api_schemas.jobs import JobLimits, JobParameters, resolve_job

REGISTRY = {
    "style": {"path": "/loras/style.safetensors"},
    "relight": {"path": "/loras/relight", "scale": 0.6, "tasks": ["edit"]},
}


def limits(**values: object) -> JobLimits:
    return JobLimits(loras=json.dumps(REGISTRY), **values)


def resolve(loras: object, images: int = 1, **values: object):
    return resolve_job(JobParameters(instruction="x", loras=loras), images, limits(**values))


def test_the_registry_is_read_from_json_with_its_defaults(monkeypatch):
    monkeypatch.setenv("DREAMOMNI2_LORAS", json.dumps(REGISTRY))
    registry = JobLimits().loras
    assert registry["style"].scale == 1.0 and registry["style"].tasks == [Task.EDIT, Task.GENERATE]
    assert registry["relight"].scale == 0.6 and registry["relight"].tasks == [Task.EDIT]
    monkeypatch.setenv("DREAMOMNI2_LORAS", "")
    assert JobLimits().loras == {}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("{not json", "must be a JSON object"),
        ('{"bad name!": {"path": "/x.safetensors"}}', "letters, digits"),
        ('{"x": {"path": "/x.safetensors", "scale": 9}}', "between -4.0 and 4.0"),
        ('{"x": {"path": "/x.safetensors", "tasks": []}}', "at least 1 item"),
        ('{"x": {"path": "/x.safetensors", "tasks": ["paint"]}}', "edit"),
        ('{"x": {"path": "/x.safetensors", "tasks": ["edit", "judge"]}}', "not judge"),
        ('{"x": {"path": ""}}', "at least 1 character"),
        ('{"x": {"path": "/x.safetensors", "url": "http://example.com/x"}}', "Extra inputs"),
    ],
)
def test_a_bad_registry_is_refused_with_the_reason(monkeypatch, value, problem):
    monkeypatch.setenv("DREAMOMNI2_LORAS", value)
    with pytest.raises(ValidationError, match=problem):
        JobLimits()


def test_a_request_gets_the_registry_scale_and_keeps_its_order():
    job = resolve([{"name": "relight"}, {"name": "style", "scale": -1.5}])
    assert [(lora.name, lora.scale) for lora in job.loras] == [("relight", 0.6), ("style", -1.5)]
    assert resolve(None).loras == [] and resolve([]).loras == []
    # Multipart sends the same JSON as text; the resolved job round-trips as the worker's parameters.
    job = resolve('[{"name": "style", "scale": 0}]')
    assert job.loras[0].scale == 0 and job.parameters().loras[0].scale == 0


@pytest.mark.parametrize(
    ("loras", "images", "code"),
    [
        ([{"name": "nope"}], 1, ErrorCode.UNKNOWN_LORA),
        ([{"name": "relight"}], 0, ErrorCode.LORA_NOT_FOR_TASK),  # a generation
        ([{"name": "style", "scale": 4.5}], 1, ErrorCode.INVALID_LORA_SCALE),
        ([{"name": "style", "scale": -1e308}], 1, ErrorCode.INVALID_LORA_SCALE),
        ([{"name": "style"}, {"name": "style", "scale": 0.5}], 1, ErrorCode.DUPLICATE_LORA),
        ([{"name": "style"}, {"name": "relight"}], 1, ErrorCode.TOO_MANY_LORAS),
    ],
)
def test_a_bad_choice_is_refused_with_its_code(loras, images, code):
    values = {"max_loras_per_job": 1} if code is ErrorCode.TOO_MANY_LORAS else {}
    with pytest.raises(InvalidInput) as raised:
        resolve(loras, images, **values)
    assert raised.value.code is code and raised.value.http_status == 422
    assert raised.value.details["field"] == "loras"


@pytest.mark.parametrize(
    "loras",
    ['[{"name": "style", "scale": NaN}]', '[{"name": "style", "scale": Infinity}]', "not json",
     [{"name": "style", "url": "http://169.254.169.254/"}], [{"name": "x" * 65}]],
)  # fmt: skip
def test_non_finite_scales_urls_and_garbage_never_pass_the_model(loras):
    with pytest.raises(ValidationError):
        JobParameters(instruction="x", loras=loras)

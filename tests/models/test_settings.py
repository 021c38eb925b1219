"""Engine settings: precision, memory modes, the translator budget, and settings that were replaced."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.modes import MemoryMode
from models.settings import (
    DEFAULT_TRANSLATOR_MAX_NEW_TOKENS,
    TINY_TRANSLATOR_MAX_NEW_TOKENS,
    EngineSettings,
    resolve_dtype,
)


def test_float16_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("DREAMOMNI2_DTYPE", "float16")
    with pytest.raises(ValidationError) as info:
        EngineSettings()
    message = str(info.value)
    assert "T5-XXL overflows in float16" in message and "DREAMOMNI2_DTYPE=bfloat16" in message
    assert "DREAMOMNI2_ALLOW_FLOAT16=true" in message


def test_float16_with_the_explicit_override(monkeypatch):
    import torch

    monkeypatch.setenv("DREAMOMNI2_DTYPE", "float16")
    monkeypatch.setenv("DREAMOMNI2_ALLOW_FLOAT16", "true")
    settings = EngineSettings()
    assert resolve_dtype(settings.dtype, "cuda") is torch.float16


def test_dtype_auto_is_bfloat16_on_gpus_and_float32_on_the_cpu():
    import torch

    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("auto", "cuda:1") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32
    with pytest.raises(ValidationError, match="bfloat16"):
        EngineSettings(dtype="float64")


@pytest.mark.parametrize("value", ["balanced", "LOW", " stream "])
def test_memory_modes_are_read_from_the_environment(monkeypatch, value):
    monkeypatch.setenv("DREAMOMNI2_MEMORY", value)
    assert EngineSettings().memory is MemoryMode(value.strip().lower())
    assert EngineSettings().memory_check is True


def test_an_unknown_memory_mode_names_the_known_ones(monkeypatch):
    monkeypatch.setenv("DREAMOMNI2_MEMORY", "tiny")
    with pytest.raises(ValidationError, match="'resident', 'balanced', 'low' or 'stream'"):
        EngineSettings()


@pytest.mark.parametrize("value", ["none", "model", "sequential"])
def test_the_old_offload_setting_points_at_the_memory_modes(monkeypatch, value):
    monkeypatch.setenv("DREAMOMNI2_OFFLOAD", value)
    with pytest.raises(ValidationError, match="replaced by DREAMOMNI2_MEMORY"):
        EngineSettings()


def test_translator_budget():
    assert DEFAULT_TRANSLATOR_MAX_NEW_TOKENS >= 600
    assert EngineSettings(preset="dreamomni2").translator_budget == DEFAULT_TRANSLATOR_MAX_NEW_TOKENS
    assert EngineSettings(preset="tiny").translator_budget == TINY_TRANSLATOR_MAX_NEW_TOKENS
    assert EngineSettings(preset="dreamomni2", translator_max_new_tokens=2048).translator_budget == 2048
    with pytest.raises(ValidationError):
        EngineSettings(translator_max_new_tokens=0)

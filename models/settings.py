"""Settings of the model engine, read from `DREAMOMNI2_*` environment variables."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from api_schemas.jobs import JobLimits


class Preset(StrEnum):
    """Which weights to load: random tiny ones built locally, or the published DreamOmni2 release."""

    TINY = "tiny"
    DREAMOMNI2 = "dreamomni2"


class Offload(StrEnum):
    """diffusers' CPU offload modes: none, whole models (`model`) or submodules (`sequential`)."""

    NONE = "none"
    MODEL = "model"
    SEQUENTIAL = "sequential"


class EngineSettings(BaseSettings):
    """Everything that decides how the engine loads and runs the models."""

    model_config = SettingsConfigDict(env_prefix="DREAMOMNI2_", extra="ignore")

    preset: Preset = Field(
        default=Preset.TINY, description="`tiny` (random weights, CPU-friendly) or `dreamomni2`."
    )
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "dreamomni2", description="Where the tiny preset is built once."
    )
    base_model: str = Field(
        default="black-forest-labs/FLUX.1-Kontext-dev",
        description="dreamomni2 preset: FLUX.1 Kontext [dev] as a Hub id or a local diffusers folder.",
    )
    adapters: str = Field(
        default="xiabs/DreamOmni2",
        description="dreamomni2 preset: Hub id or local folder holding edit_lora/, gen_lora/ and vlm-model/.",
    )
    device: str = Field(
        default="auto", description="`auto` (cuda when available, else cpu), `cuda`, `cuda:1`, `cpu`."
    )
    dtype: str = Field(
        default="auto", description="`auto` (bfloat16 on GPU, float32 on CPU), `bfloat16`, ..."
    )
    offload: Offload = Field(
        default=Offload.NONE,
        description="`none`, `model` (CPU offload per model) or `sequential` (least memory).",
    )
    translator: bool = Field(default=True, description="Load and use the Qwen2.5-VL instruction translator.")
    translator_device: str = Field(default="auto", description="Device of the translator; `auto` = `device`.")
    translator_max_new_tokens: int = Field(default=256, ge=1, le=4096, description="Translator token budget.")
    translator_max_image_pixels: int = Field(
        default=1_254_400,
        ge=56 * 56,
        description="Pixels each image is scaled to at most for the translator.",
    )
    max_area: int | None = Field(
        default=None, description="Output area in pixels; left out: 1024*1024 (tiny preset: 64*64)."
    )
    bucket_scale: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Scale of the input resolution buckets; left out: 1 (tiny: 1/16).",
    )
    limits: JobLimits = Field(default_factory=JobLimits)


def resolve_device(device: str) -> str:
    """`auto` becomes `cuda` when a GPU is visible, else `cpu`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    """`auto` becomes bfloat16 on an accelerator and float32 on the CPU."""
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ValueError(
            f"DREAMOMNI2_DTYPE={dtype!r} is not a torch dtype; use bfloat16, float16 or float32."
        ) from None

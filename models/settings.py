"""Settings of the model engine, read from `DREAMOMNI2_*` environment variables."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from api_schemas.jobs import JobLimits
from models.modes import MemoryMode
from models.profiles import SpeedProfile

if TYPE_CHECKING:
    import torch

#: The translator's default answer budget in tokens. The reference allows 4096; a useful prompt runs
#: at most to T5's 512 tokens (a few hundred words), and an answer cut short falls back to the raw
#: instruction, a very different image, so the bound sits well above any real answer.
DEFAULT_TRANSLATOR_MAX_NEW_TOKENS = 1024
#: The tiny preset's budget: its random VLM never stops early, and 1024 tokens would make every
#: development job take seconds (as its 64x64 output area, a stand-in's shrinking, not the method's).
TINY_TRANSLATOR_MAX_NEW_TOKENS = 32


class Preset(StrEnum):
    """Which weights to load: random tiny ones built locally, or the published DreamOmni2 release."""

    TINY = "tiny"
    DREAMOMNI2 = "dreamomni2"


class Dtype(StrEnum):
    """Weight and compute dtype. `auto`: bfloat16 on an accelerator, float32 on the CPU."""

    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT16 = "float16"


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
    dtype: Dtype = Field(
        default=Dtype.AUTO, description="`auto`, `bfloat16`, `float32` (`float16`: see below)."
    )
    allow_float16: bool = Field(
        default=False,
        description="Accept DREAMOMNI2_DTYPE=float16 although T5-XXL overflows in it (NaN, black images).",
    )
    memory: MemoryMode = Field(
        default=MemoryMode.RESIDENT,
        description="Memory mode: `resident`, `balanced`, `low` or `stream` (see `python -m models plan`).",
    )
    memory_check: bool = Field(
        default=True,
        description="At start, refuse a memory mode the GPU's free memory cannot hold (the planner's peak).",
    )
    speed: SpeedProfile = Field(
        default=SpeedProfile.REFERENCE,
        description="Speed profile: `reference` (eager, as the reference), `compiled` (lossless), `fp8`.",
    )
    compile_cache_dir: Path | None = Field(
        default=None,
        description="Where torch.compile keeps its artifacts (default: CACHE_DIR/torch-compile).",
    )
    offload: str | None = Field(
        default=None, description="Removed: replaced by DREAMOMNI2_MEMORY.", exclude=True
    )
    translator: bool = Field(default=True, description="Load and use the Qwen2.5-VL instruction translator.")
    translator_device: str = Field(default="auto", description="Device of the translator; `auto` = `device`.")
    translator_max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Translator answer budget in tokens; left out: 1024 (tiny preset: 32).",
    )
    first_block_threshold: float = Field(
        default=0.08,
        ge=0,
        description="step_cache=first_block: skip the other blocks when the first block's output changed "
        "by less than this (relative); 0 never skips.",
    )
    taylorseer_interval: int = Field(
        default=3, ge=1, description="step_cache=taylorseer: one full step in this many; 1 never predicts."
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
    batch_images: int | Literal["auto"] = Field(
        default="auto",
        description="Output images of one job (`num_images`) sampled together as one batch: `auto` (on a "
        "GPU, as many as the memory plan fits with the job's largest image count; on a CPU, 1) or a "
        "number; 1: one after another, each bit-identical to a one-image job with its seed.",
    )
    lora_cache_bytes: int = Field(
        default=4 * 2**30,
        ge=0,
        description="Host memory for the registered LoRAs (DREAMOMNI2_LORAS) kept loaded; the least recently "
        "used are dropped past it and read again when a job asks for them.",
    )
    limits: JobLimits = Field(default_factory=JobLimits)

    @property
    def translator_budget(self) -> int:
        """The translator's answer budget: the setting, or the preset's default."""
        if self.translator_max_new_tokens is not None:
            return self.translator_max_new_tokens
        if self.preset is Preset.TINY:
            return TINY_TRANSLATOR_MAX_NEW_TOKENS
        return DEFAULT_TRANSLATOR_MAX_NEW_TOKENS

    @property
    def torch_compile_dir(self) -> Path:
        return self.compile_cache_dir or self.cache_dir / "torch-compile"

    @model_validator(mode="after")
    def _profile_fits_the_memory_mode(self) -> EngineSettings:
        if self.speed is not SpeedProfile.REFERENCE and self.memory in (MemoryMode.LOW, MemoryMode.STREAM):
            raise ValueError(
                f"DREAMOMNI2_SPEED={self.speed.value} needs the transformer resident in bf16, which "
                f"DREAMOMNI2_MEMORY={self.memory.value} does not keep: use DREAMOMNI2_MEMORY=resident or "
                "balanced, or DREAMOMNI2_SPEED=reference."
            )
        return self

    @field_validator("memory", "dtype", "speed", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("batch_images", mode="before")
    @classmethod
    def _batch_images(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            if value != "auto":
                try:
                    value = int(value)
                except ValueError:
                    message = f"DREAMOMNI2_BATCH_IMAGES must be `auto` or a number, got {value!r}"
                    raise ValueError(message) from None
        if isinstance(value, int) and value < 1:
            raise ValueError(f"DREAMOMNI2_BATCH_IMAGES must be `auto` or 1 or more, got {value}")
        return value

    @field_validator("offload")
    @classmethod
    def _offload_is_gone(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(
                "DREAMOMNI2_OFFLOAD was replaced by DREAMOMNI2_MEMORY: none -> resident; model -> "
                "balanced (40-48 GB) or low (24 GB); sequential -> stream. Unset DREAMOMNI2_OFFLOAD."
            )
        return value

    @model_validator(mode="after")
    def _refuse_float16(self) -> EngineSettings:
        if self.dtype is Dtype.FLOAT16 and not self.allow_float16:
            raise ValueError(
                "DREAMOMNI2_DTYPE=float16 is refused: T5-XXL overflows in float16 and FLUX then gives NaN "
                "or black images. Use DREAMOMNI2_DTYPE=bfloat16 (the reference's, and the default on "
                "GPUs); set DREAMOMNI2_ALLOW_FLOAT16=true only if you know your weights survive float16."
            )
        return self


def resolve_device(device: str) -> str:
    """`auto` becomes `cuda` when a GPU is visible, else `cpu`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: Dtype | str, device: str) -> torch.dtype:
    """`auto` becomes bfloat16 on an accelerator and float32 on the CPU."""
    import torch

    dtype = Dtype(dtype)
    if dtype is Dtype.AUTO:
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, dtype.value)

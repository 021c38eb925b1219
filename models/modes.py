"""The memory modes (`DREAMOMNI2_MEMORY`): where each of the worker's models lives, in one table.

`MODES` is read by the planner (`models.memory`), which predicts a mode's peak, and by the engine's
placement (`models.placement`), which puts the models there; neither keeps its own copy of the rules.
Free of torch, so settings and the gateway can name the modes cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class MemoryMode(StrEnum):
    """`DREAMOMNI2_MEMORY`: where the models live between and during jobs."""

    RESIDENT = "resident"
    BALANCED = "balanced"
    LOW = "low"
    STREAM = "stream"


class Residency(StrEnum):
    """How a component uses the accelerator."""

    RESIDENT = "resident"  # on its device for the worker's whole life
    SWAPPED = "swapped"  # in (pinned) host memory; copied onto the device while it runs
    STREAMED = "streamed"  # in host memory; moved through the device block by block while it runs


class Stage(StrEnum):
    TRANSLATE = "translate"
    ENCODE_PROMPT = "encode_prompt"
    ENCODE_IMAGES = "encode_images"
    DENOISE = "denoise"
    DECODE = "decode"


class Group(StrEnum):
    """What moves together: the engine onloads a group for the stages that use it."""

    TRANSLATOR = "translator"
    TEXT_ENCODERS = "text_encoders"
    TRANSFORMER = "transformer"  # with both LoRAs; the VAE is always resident (0.17 GB)


#: The stages each group is on the device for, when it is not resident. The transformer is onloaded
#: around the whole pipeline call, so it is present while the VAE encodes and decodes too.
GROUP_STAGES: dict[Group, tuple[Stage, ...]] = {
    Group.TRANSLATOR: (Stage.TRANSLATE,),
    Group.TEXT_ENCODERS: (Stage.ENCODE_PROMPT,),
    Group.TRANSFORMER: (Stage.ENCODE_IMAGES, Stage.DENOISE, Stage.DECODE),
}


@dataclass(frozen=True)
class ModeSpec:
    """One memory mode: where each group lives, and for which cards it is meant."""

    transformer: Residency
    text_encoders: Residency
    #: The translator when it shares the pipeline's device; on a device of its own it is resident.
    translator: Residency
    fp8_transformer: bool
    cards: str
    summary: str

    def residency(self, group: Group) -> Residency:
        return {
            Group.TRANSLATOR: self.translator,
            Group.TEXT_ENCODERS: self.text_encoders,
            Group.TRANSFORMER: self.transformer,
        }[group]


MODES: dict[MemoryMode, ModeSpec] = {
    MemoryMode.RESIDENT: ModeSpec(
        transformer=Residency.RESIDENT,
        text_encoders=Residency.RESIDENT,
        translator=Residency.RESIDENT,
        fp8_transformer=False,
        cards="80 GB and larger (A100/H100 80 GB, H200, B200)",
        summary="everything on the GPU in bf16; fastest, as the reference runs",
    ),
    MemoryMode.BALANCED: ModeSpec(
        transformer=Residency.RESIDENT,
        text_encoders=Residency.SWAPPED,
        translator=Residency.SWAPPED,
        fp8_transformer=False,
        cards="40-48 GB (L40S, A6000, A100 40 GB with fewer images)",
        summary="transformer and VAE resident in bf16; translator and text encoders on the GPU only "
        "while they run; exact",
    ),
    MemoryMode.LOW: ModeSpec(
        transformer=Residency.SWAPPED,
        text_encoders=Residency.SWAPPED,
        translator=Residency.SWAPPED,
        fp8_transformer=True,
        cards="24 GB (RTX 4090, L4, A10)",
        summary="transformer weights stored in fp8 (bf16 compute); every model on the GPU only while "
        "it runs; close to, not equal to, bf16",
    ),
    MemoryMode.STREAM: ModeSpec(
        transformer=Residency.STREAMED,
        text_encoders=Residency.SWAPPED,
        translator=Residency.SWAPPED,
        fp8_transformer=False,
        cards="24 GB when fp8 is not wanted; 16 GB with the translator elsewhere",
        summary="transformer streamed block by block in bf16 (group offloading on CUDA streams); "
        "others on the GPU only while they run; exact, slowest",
    ),
}


def parse_device(device: object) -> tuple[str, int]:
    """`"cuda:1"` -> ("cuda", 1); a bare type means index 0 (torch's default device)."""
    kind, _, index = str(device).partition(":")
    return kind, int(index or 0)


def same_device(a: object, b: object) -> bool:
    """`cuda` and `cuda:0` are one device; so are two `cpu`s."""
    return parse_device(a) == parse_device(b)


def is_cpu(device: object) -> bool:
    return parse_device(device)[0] == "cpu"


def translator_residency(mode: MemoryMode, device: object, translator_device: object) -> Residency:
    """The translator as the mode says when it shares the pipeline's device; resident on its own."""
    if not same_device(translator_device, device):
        return Residency.RESIDENT
    return MODES[MemoryMode(mode)].translator

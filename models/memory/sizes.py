"""Model sizes for the planner: the networks' configs, weight bytes and tensor sizes, read without weights.

The full-size architectures are built on the meta device (sizes exact, nothing allocated); the fp8
storage of the `low` mode (`models.fp8`) is applied to the meta transformer with the worker's own
code, so the bytes it keeps (fp8 codes, fp32 row scales, the rest in bf16) are the worker's. LoRA
sizes come from the files' headers, or from an assumed rank where no file is local.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.pinned import module_tensors

if TYPE_CHECKING:
    from models.architectures import FullSizeModels

GiB = 1024**3
#: LoRA rank assumed for the published adapters when their files are not local (the release does not
#: state it); a rank-64 LoRA on the attention projections is about 0.2 GB in bf16.
ASSUMED_LORA_RANK = 64
#: Text tokens the translator reads besides the images: chat template, task suffix and an
#: instruction of up to about 2000 characters.
TRANSLATOR_TEXT_TOKENS = 1024
#: T5's prompt length in the reference (and the pipeline's max_sequence_length).
T5_TOKENS = 512
CLIP_TOKENS = 77


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored."""
    return sum(t.numel() * t.element_size() for t in module_tensors(module))


def tensor_sizes(module: torch.nn.Module) -> tuple[int, ...]:
    """The byte size of each of a module's parameters and buffers, as stored."""
    return tuple(t.numel() * t.element_size() for t in module_tensors(module))


def safetensors_numels(path: Path) -> list[int]:
    """Elements of each tensor in a safetensors file, from its header alone (no tensor is read)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return [math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"]


def safetensors_numel(path: Path) -> int:
    """Number of elements in a safetensors file, from its header alone."""
    return sum(safetensors_numels(path))


def lora_numels(transformer: torch.nn.Module, rank: int, targets: Iterable[str]) -> list[int]:
    """Elements of each tensor (A, then B) of a rank-`rank` LoRA on every Linear named by `targets`."""
    targets = tuple(targets)
    found = []
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            found += [rank * module.in_features, module.out_features * rank]
    return found


def lora_numel(transformer: torch.nn.Module, rank: int, targets: Iterable[str]) -> int:
    """Elements of a rank-`rank` LoRA on every Linear whose name ends with one of `targets`."""
    return sum(lora_numels(transformer, rank, targets))


@dataclass(frozen=True)
class ArchitectureSizes:
    """Everything the planner needs to know about the models, read off configs (no weights).

    Bytes are in `dtype`, the dtype the worker stores and computes in (bfloat16 on a GPU; the tiny
    preset on a CPU: float32).
    """

    transformer_config: dict[str, Any]
    vae_config: dict[str, Any]
    t5_config: dict[str, Any]
    clip_config: dict[str, Any]
    vlm_text: dict[str, int]
    vlm_vision: dict[str, int]
    vlm_pixels: tuple[int, int]  # the translator processor's (min_pixels, max_pixels)
    dtype: str
    weight_bytes: dict[str, int]  # per component, as stored in `dtype`
    #: Per component, the byte size of each tensor (what host blocks are packed from).
    tensor_bytes: dict[str, tuple[int, ...]]
    transformer_fp8_bytes: int
    transformer_fp8_tensor_bytes: tuple[int, ...]
    largest_cast_layer_bytes: int  # the largest weight an fp8 layer dequantizes at once (in `dtype`)
    stream_window_bytes: int  # two neighbouring blocks plus the non-block layers
    lora_numel: dict[str, int]
    lora_tensor_numels: dict[str, tuple[int, ...]]
    #: The weights the LoRAs adapt, as a compiled profile fuses them (q/k/v as one): the pristine
    #: copies it keeps to rewrite them from on every adapter switch.
    adapted_weight_bytes: tuple[int, ...]
    lora_rank_assumed: int | None
    lora_targets: tuple[str, ...]
    lora_rank: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @classmethod
    def build(
        cls,
        models: FullSizeModels,
        *,
        vlm_pixels: tuple[int, int],
        lora_files: dict[str, Path] | None = None,
        lora_rank: int = ASSUMED_LORA_RANK,
    ) -> ArchitectureSizes:
        """Size `models` (a `FullSizeModels` on the meta device, in the dtype to plan for)."""
        from models.architectures import LORA_TARGET_MODULES
        from models.fp8 import largest_dequantized_bytes, store_in_fp8

        transformer = models.transformer
        dtype = transformer.dtype
        parts = {
            "transformer": transformer,
            "t5_xxl": models.text_encoder_2,
            "clip_l": models.text_encoder,
            "vae": models.vae,
        }
        if models.vlm is not None:
            parts["translator"] = models.vlm
        tensors = {name: tensor_sizes(module) for name, module in parts.items()}
        sizes = {name: sum(found) for name, found in tensors.items()}
        sizes.setdefault("translator", 0)
        block_bytes = [
            module_bytes(b) for b in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        ]
        in_blocks = sum(block_bytes)
        window = (
            max(a + b for a, b in zip(block_bytes, block_bytes[1:], strict=False))
            if len(block_bytes) > 1
            else block_bytes[0]
        )

        lora_files = lora_files or {}
        lora, assumed = {}, None
        for name in ("edit_lora", "gen_lora"):
            path = lora_files.get(name)
            if path is not None and path.is_file():
                lora[name] = tuple(safetensors_numels(path))
            else:
                lora[name] = tuple(lora_numels(transformer, lora_rank, LORA_TARGET_MODULES))
                assumed = lora_rank

        adapted = adapted_weights(transformer, LORA_TARGET_MODULES)
        # The worker's own fp8 storage, on the meta transformer: the bytes it keeps are the worker's.
        store_in_fp8(transformer, dtype)
        # The largest weight a stored layer dequantizes for its forward, a transient of its own.
        largest_cast = largest_dequantized_bytes(transformer)
        fp8_tensors = tensor_sizes(transformer)
        vlm = models.vlm
        text = vlm.config.text_config if vlm is not None else None
        vision = vlm.config.vision_config if vlm is not None else None
        return cls(
            transformer_config=dict(transformer.config),
            vae_config=dict(models.vae.config),
            t5_config=models.text_encoder_2.config.to_dict(),
            clip_config=models.text_encoder.config.to_dict(),
            vlm_text=_pick(
                text,
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_key_value_heads",
                "num_attention_heads",
                "vocab_size",
            ),  # fmt: skip
            vlm_vision=_pick(
                vision,
                "hidden_size",
                "intermediate_size",
                "patch_size",
                "spatial_merge_size",
                "temporal_patch_size",
                "in_channels",
                "num_heads",
                "out_hidden_size",
            ),  # fmt: skip
            vlm_pixels=vlm_pixels,
            dtype=str(dtype).removeprefix("torch."),
            weight_bytes=sizes,
            tensor_bytes=tensors,
            transformer_fp8_bytes=sum(fp8_tensors),
            transformer_fp8_tensor_bytes=fp8_tensors,
            largest_cast_layer_bytes=largest_cast,
            stream_window_bytes=window + (sizes["transformer"] - in_blocks),
            lora_numel={name: sum(numels) for name, numels in lora.items()},
            lora_tensor_numels=lora,
            adapted_weight_bytes=adapted,
            lora_rank_assumed=assumed,
            lora_targets=tuple(LORA_TARGET_MODULES),
            lora_rank=lora_rank,
        )


#: The projections a compiled profile fuses into one weight (`fuse_qkv_projections`).
FUSED_GROUPS = (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))


def adapted_weights(transformer: torch.nn.Module, targets: Iterable[str]) -> tuple[int, ...]:
    """Bytes of each weight the LoRAs on `targets` adapt, q/k/v (and the added ones) fused into one."""
    targets = tuple(targets)
    found: dict[str, int] = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        fused = next((f"{parent}.{group[0]}" for group in FUSED_GROUPS if leaf in group), name)
        found[fused] = found.get(fused, 0) + module.weight.numel() * module.weight.element_size()
    return tuple(found.values())


def _pick(config: object | None, *names: str) -> dict[str, int]:
    return {} if config is None else {name: getattr(config, name) for name in names}


@functools.cache
def published_sizes(lora_rank: int = ASSUMED_LORA_RANK, dtype: str = "bfloat16") -> ArchitectureSizes:
    """Sizes of the published release (FLUX.1 Kontext [dev] + DreamOmni2), from built-in configs."""
    from models.architectures import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, build_full_size

    return ArchitectureSizes.build(
        build_full_size("meta", getattr(torch, dtype)),
        vlm_pixels=(QWEN_MIN_PIXELS, QWEN_MAX_PIXELS),
        lora_rank=lora_rank,
    )


def layout_sizes(
    kontext: str | Path, edit_lora: Path, gen_lora: Path, vlm: Path, dtype: torch.dtype = torch.bfloat16
) -> ArchitectureSizes:
    """Sizes of the models a worker will load in `dtype`, read off their local folders (configs, headers).

    A part with no local folder (the base model still named by its Hub id, say) is sized from the
    published architecture instead, and LoRAs with no local file from `ASSUMED_LORA_RANK`.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoConfig, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    from transformers import Qwen2_5_VLForConditionalGeneration as QwenVL

    from models import architectures as arch
    from models.adapters import LORA_WEIGHT_NAME

    kontext = Path(kontext)
    local = (kontext / "transformer" / "config.json").is_file()
    with arch.building_on("meta", dtype):
        if local:
            transformer = FluxTransformer2DModel.from_config(
                FluxTransformer2DModel.load_config(kontext / "transformer")
            )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(kontext / "vae"))
            clip = CLIPTextModel(CLIPTextConfig.from_pretrained(kontext / "text_encoder"))
            t5 = T5EncoderModel(T5Config.from_pretrained(kontext / "text_encoder_2"))
        else:
            transformer, vae = arch.build_flux_transformer(), arch.build_flux_vae()
            clip, t5 = arch.build_clip_l(), arch.build_t5_xxl()
        vlm_model = (
            QwenVL(AutoConfig.from_pretrained(vlm))
            if (vlm / "config.json").is_file()
            else arch.build_qwen25_vl_7b()
        )
        models = arch.FullSizeModels(transformer, vae, clip, t5, vlm_model)
    return ArchitectureSizes.build(
        models,
        vlm_pixels=_processor_pixels(vlm),
        lora_files={"edit_lora": edit_lora / LORA_WEIGHT_NAME, "gen_lora": gen_lora / LORA_WEIGHT_NAME},
    )


def _processor_pixels(vlm: Path) -> tuple[int, int]:
    from models.architectures import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS

    for name in ("preprocessor_config.json", "processor_config.json"):
        path = vlm / name
        if path.is_file():
            config = json.loads(path.read_text())
            config = config.get("image_processor", config)
            size = config.get("size") or {}
            return (
                int(config.get("min_pixels") or size.get("shortest_edge") or QWEN_MIN_PIXELS),
                int(config.get("max_pixels") or size.get("longest_edge") or QWEN_MAX_PIXELS),
            )
    return QWEN_MIN_PIXELS, QWEN_MAX_PIXELS

"""The published DreamOmni2 architectures, as configs: full-size models without their weights.

Nothing here loads or downloads a weight. The memory planner builds these on the meta device (sizes
only, instantly); the GPU benches build them on CUDA with random weights (time and memory measured
honestly, quality meaningless). Shapes are those of FLUX.1 Kontext [dev] (transformer, VAE, CLIP-L,
T5-XXL) and of Qwen2.5-VL-7B-Instruct, whose architecture the DreamOmni2 translator fine-tunes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
)

#: FLUX.1 Kontext [dev] transformer: 19 double + 38 single blocks, 24 heads x 128.
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
#: What every FLUX VAE shares with the real one: 8x downsampling, 16 latent channels, the shift and scale.
FLUX_VAE_LAYOUT = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
)
FLUX_VAE = dict(
    FLUX_VAE_LAYOUT,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
)
QWEN25_VL_7B_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=128000,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
)
QWEN25_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    out_hidden_size=3584,
    fullatt_block_indexes=[7, 15, 23, 31],
)
#: The attention projections of the Flux blocks, which the DreamOmni2 LoRAs adapt (as Kontext LoRAs
#: trained with diffusers do); peft matches them as name suffixes, and the single blocks simply have
#: no add_* / to_add_out / to_out layers.
LORA_TARGET_MODULES = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]
#: The real Qwen2.5-VL special token ids (tokenizer.json of Qwen2.5-VL-7B-Instruct).
QWEN_TOKEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
#: The real Qwen2.5-VL image processor bounds (preprocessor_config.json): 4 to 16384 merged tokens.
QWEN_MIN_PIXELS = 3136
QWEN_MAX_PIXELS = 12845056


@contextlib.contextmanager
def building_on(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on `device` in `dtype`: no fp32 host copy of 12B weights.

    On the meta device nothing is allocated at all, which is how the memory planner sizes models.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_flux_transformer(**overrides: Any) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(**{**FLUX_TRANSFORMER, **overrides}).eval()


def build_flux_vae() -> AutoencoderKL:
    return AutoencoderKL(**FLUX_VAE).eval()


def build_clip_l(*, eos_token_id: int = 49407, pad_token_id: int = 49407) -> CLIPTextModel:
    config = CLIPTextConfig(**CLIP_L, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return CLIPTextModel(config).eval()


def build_t5_xxl(*, pad_token_id: int = 0, eos_token_id: int = 1, **overrides: Any) -> T5EncoderModel:
    config = T5Config(**{**T5_XXL, **overrides}, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    return T5EncoderModel(config).eval()


def qwen25_vl_7b_config(token_ids: dict[str, int] | None = None) -> Qwen2_5_VLConfig:
    ids = {**QWEN_TOKEN_IDS, **(token_ids or {})}
    return Qwen2_5_VLConfig(
        text_config=dict(
            QWEN25_VL_7B_TEXT, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
        ),
        vision_config=QWEN25_VL_7B_VISION,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def build_qwen25_vl_7b(token_ids: dict[str, int] | None = None) -> Qwen2_5_VLForConditionalGeneration:
    ids = {**QWEN_TOKEN_IDS, **(token_ids or {})}
    model = Qwen2_5_VLForConditionalGeneration(qwen25_vl_7b_config(ids)).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


@dataclass
class FullSizeModels:
    """Every network of the `dreamomni2` preset, full size (weights random, or on the meta device)."""

    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: T5EncoderModel
    vlm: Qwen2_5_VLForConditionalGeneration | None


def build_full_size(
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.bfloat16,
    *,
    clip_ids: dict[str, int] | None = None,
    t5_ids: dict[str, int] | None = None,
    qwen_ids: dict[str, int] | None = None,
    translator: bool = True,
) -> FullSizeModels:
    """Build the full-size architectures on `device` in `dtype` (meta: sizes only, no memory).

    The `*_ids` override special token ids, for pairing the models with tokenizers other than the real
    ones (the GPU bench reuses the tiny preset's tokenizers, whose ids are small).
    """
    with building_on(device, dtype):
        return FullSizeModels(
            transformer=build_flux_transformer(),
            vae=build_flux_vae(),
            text_encoder=build_clip_l(**(clip_ids or {})),
            text_encoder_2=build_t5_xxl(**(t5_ids or {})),
            vlm=build_qwen25_vl_7b(qwen_ids) if translator else None,
        )

"""The tiny random-weight preset: every DreamOmni2 component, shaped like the real one but a few MB.

Nothing may be downloaded from the Hugging Face Hub in development, CI or on benchmark hosts, yet the
service must run the real diffusers / transformers / peft code. This module builds random-weight
stand-ins in the same folder layouts as the published weights, so the production loaders
(`FluxKontextPipeline.from_pretrained`, `load_lora_weights`, `Qwen2_5_VLForConditionalGeneration` and
the processor) read them unchanged:

    <out>/kontext/      a diffusers FluxKontextPipeline folder (like black-forest-labs/FLUX.1-Kontext-dev)
    <out>/edit_lora/    pytorch_lora_weights.safetensors (like xiabs/DreamOmni2 edit_lora/)
    <out>/gen_lora/     pytorch_lora_weights.safetensors (like xiabs/DreamOmni2 gen_lora/)
    <out>/vlm-model/    a Qwen2.5-VL model + processor files (like xiabs/DreamOmni2 vlm-model/)

Every build uses fixed seeds, so two builds give byte-identical weight files.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
)
from peft import LoraConfig, get_peft_model_state_dict
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from models.adapters import LORA_WEIGHT_NAME
from models.architectures import FLUX_VAE_LAYOUT, LORA_TARGET_MODULES, build_flux_transformer
from models.translator import QWEN2_VL_CHAT_TEMPLATE

# Bump when the builder's output changes: the cache folder name carries it, so old caches are not reused.
TINY_VERSION = 1
TINY_DIRNAME = f"tiny-v{TINY_VERSION}"

KONTEXT_DIRNAME = "kontext"
EDIT_LORA_DIRNAME = "edit_lora"
GEN_LORA_DIRNAME = "gen_lora"
VLM_DIRNAME = "vlm-model"

# Width of both text encoders: T5 d_model feeds joint_attention_dim, CLIP's pooled output feeds
# pooled_projection_dim, exactly as 4096 / 768 do in the real model.
TEXT_HIDDEN = 32

# The real Kontext scheduler config (scheduler/scheduler_config.json of FLUX.1-Kontext-dev).
KONTEXT_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

LORA_RANK = 4
# alpha != rank, so a reload that lost the adapter metadata (and with it lora_alpha) shows.
LORA_ALPHA = 8
# peft starts lora_B at zero (a no-op adapter). With this spread a random adapter moves the final
# latents of a 64x64, 4-step run by about a third (about 10/255 per pixel after the random VAE).
LORA_B_STD = 1.0

# The special tokens of the real Qwen2/2.5-VL tokenizer after <|endoftext|>, in their real order
# (ids 151644 to 151656 there).
QWEN_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Small pixel budget for the tiny VLM: 56x56 .. 112x112 pixels is 4 .. 16 vision tokens per image.
TINY_VLM_MIN_PIXELS = 56 * 56
TINY_VLM_MAX_PIXELS = 112 * 112


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in a fixed order."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _build_clip_tokenizer() -> CLIPTokenizer:
    # Byte-level BPE with no merges: every byte is a token, word-final bytes carry CLIP's "</w>".
    alphabet = _byte_alphabet()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = alphabet + [c + "</w>" for c in alphabet] + specials
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _build_t5_tokenizer() -> T5Tokenizer:
    # Unigram over single characters (with and without the word-start marker), scored so that
    # word-start pieces win; no sentinel tokens because Flux only encodes prompts.
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    chars += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    chars += [str(d) for d in range(10)]
    chars += list(".,;:!?'\"-()/")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars]
    vocab += [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    # Byte-level BPE with no merges plus the chat / vision special tokens the template and the
    # processor rely on. The chat template goes to chat_template.json (see _save_vlm).
    vocab = {token: i for i, token in enumerate(_byte_alphabet())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768)
    tokenizer.add_special_tokens({"extra_special_tokens": QWEN_SPECIAL_TOKENS})
    return tokenizer


def _build_transformer() -> FluxTransformer2DModel:
    # The real Kontext transformer's layout (64 input channels, guidance embeddings), shrunk: one block
    # of each kind, 2 heads of 16 (the rope axes sum to the head size).
    torch.manual_seed(0)
    return build_flux_transformer(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        axes_dims_rope=[4, 6, 6],
    )


def _build_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        **FLUX_VAE_LAYOUT, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4
    ).eval()


def _build_clip_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    torch.manual_seed(2)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        projection_dim=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _build_t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    torch.manual_seed(3)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_HIDDEN,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def build_kontext_pipeline() -> FluxKontextPipeline:
    clip_tokenizer = _build_clip_tokenizer()
    t5_tokenizer = _build_t5_tokenizer()
    return FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**KONTEXT_SCHEDULER_CONFIG),
        vae=_build_vae(),
        text_encoder=_build_clip_encoder(clip_tokenizer),
        tokenizer=clip_tokenizer,
        text_encoder_2=_build_t5_encoder(t5_tokenizer),
        tokenizer_2=t5_tokenizer,
        transformer=_build_transformer(),
    )


def _save_random_lora(transformer: FluxTransformer2DModel, out: Path, seed: int) -> None:
    """Save a random transformer LoRA in the diffusers layout `load_lora_weights` reads."""
    torch.manual_seed(seed)
    # A copy, so the base transformer saved in kontext/ never carries adapter layers.
    model = copy.deepcopy(transformer)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGET_MODULES)
    model.add_adapter(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, LORA_B_STD)
    # Without the metadata lora_alpha is lost on reload and the adapter scale changes. peft keeps
    # target_modules as a set, whose order varies between processes: sort it for stable files.
    metadata = model.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    FluxKontextPipeline.save_lora_weights(
        out,
        transformer_lora_layers=get_peft_model_state_dict(model),
        weight_name=LORA_WEIGHT_NAME,
        transformer_lora_adapter_metadata=metadata,
    )


def build_vlm(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(4)
    eos_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        # head_dim 16: the three M-RoPE sections (time, height, width) must sum to head_dim / 2.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": eos_ids[0],
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "out_hidden_size": 64,
        "fullatt_block_indexes": [0],
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Like the real generation_config.json: stop at <|im_end|> or <|endoftext|>.
    model.generation_config = GenerationConfig(
        bos_token_id=text_config["bos_token_id"],
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_vlm(out: Path) -> None:
    """Save the tiny VLM in the published layout of a Qwen2.5-VL fine-tune.

    That layout predates transformers 5: the image processor in `preprocessor_config.json` under the
    torchvision class name, the chat template in `chat_template.json`. Writing it (rather than what
    `processor.save_pretrained` writes today) keeps the tiny preset on the same loading path as the
    real `vlm-model/` folder.
    """
    tokenizer = build_qwen_tokenizer()
    build_vlm(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
            "min_pixels": TINY_VLM_MIN_PIXELS,
            "max_pixels": TINY_VLM_MAX_PIXELS,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        },
    )
    _write_json(out / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})


def build_tiny(out: Path) -> None:
    """Write the tiny preset (kontext/, edit_lora/, gen_lora/, vlm-model/) into `out`.

    Deterministic: every component is built from a fixed seed, so repeated builds write identical
    weights. `out` is created if needed; existing files in it are overwritten.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_kontext_pipeline()
    pipe.save_pretrained(out / KONTEXT_DIRNAME)
    _save_random_lora(pipe.transformer, out / EDIT_LORA_DIRNAME, seed=100)
    _save_random_lora(pipe.transformer, out / GEN_LORA_DIRNAME, seed=200)
    _save_vlm(out / VLM_DIRNAME)


def ensure_tiny(cache_dir: Path) -> Path:
    """Return a folder holding the tiny preset under `cache_dir`, building it on first use.

    Safe when several processes call it at once: each builds into its own temporary folder beside the
    target and renames it into place; a rename onto a finished folder fails, and the loser keeps the
    winner's copy. The folder name carries TINY_VERSION, so a changed builder never reuses old files.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / TINY_DIRNAME
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_DIRNAME}-", dir=cache_dir))
    try:
        build_tiny(tmp)
        _make_readable(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its finished build first; a non-empty target is never replaced.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _make_readable(root: Path) -> None:
    # mkdtemp and the safetensors writer create owner-only entries; a shared cache must be readable
    # by the other users of the machine (a worker and a test run, say).
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m models.tiny OUT` builds the tiny preset into OUT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out", type=Path, help="folder to write kontext/, edit_lora/, gen_lora/, vlm-model/ into"
    )
    args = parser.parse_args(argv)
    build_tiny(args.out)
    for name in (KONTEXT_DIRNAME, EDIT_LORA_DIRNAME, GEN_LORA_DIRNAME, VLM_DIRNAME):
        folder = args.out / name
        print(f"{folder}  ({_folder_size(folder) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

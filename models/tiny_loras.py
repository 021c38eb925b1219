"""Tiny stand-ins for community FLUX Kontext LoRAs, for the tiny transformer (`models.tiny`).

One random LoRA, written in any of the layouts the service reads (`models.user_loras`):

- `peft`: diffusers / peft keys (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`) with the
  adapter metadata carrying `lora_alpha`, as `save_lora_weights` and diffusers' trainers write them;
- `kohya`: sd-scripts' FLUX keys in the original model's names (`lora_unet_double_blocks_0_img_attn_qkv
  .lora_down.weight`, `.alpha`), q/k/v fused, as most community FLUX LoRAs are published;
- `comfyui`: the same under ComfyUI's names (`diffusion_model.double_blocks.0.img_attn.qkv.lora_down
  .weight`).

The three layouts of one seed, rank and alpha hold the same adapter: diffusers converts the kohya and
ComfyUI ones to exactly the peft one's update (the alpha / rank scale is a power of two here, which
the conversion moves into the weights exactly). `python -m models.tiny_loras OUT.safetensors` writes one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYOUTS = ("peft", "kohya", "comfyui")
#: The tiny transformer's widths: 2 heads of 16, its MLP 4x, the single block's output projection
#: reading attention and MLP together.
INNER = 32
MLP = 4 * INNER
#: What the stand-in adapts, in the original model's names: (module, in, out) and the diffusers
#: modules each one's rows become (q, k and v fused in the original's qkv projections).
MODULES: dict[str, tuple[int, int, list[str]]] = {
    "double_blocks.0.img_attn.qkv": (INNER, 3 * INNER, [f"transformer_blocks.0.attn.to_{p}" for p in "qkv"]),
    "double_blocks.0.img_attn.proj": (INNER, INNER, ["transformer_blocks.0.attn.to_out.0"]),
    "double_blocks.0.txt_attn.qkv": (
        INNER, 3 * INNER, [f"transformer_blocks.0.attn.add_{p}_proj" for p in "qkv"]
    ),
    "double_blocks.0.img_mlp.0": (INNER, MLP, ["transformer_blocks.0.ff.net.0.proj"]),
    "single_blocks.0.linear2": (INNER + MLP, INNER, ["single_transformer_blocks.0.proj_out"]),
}  # fmt: skip


def random_lora(seed: int, rank: int, std: float = 0.5) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) per original module name, from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (fan_in, fan_out, _) in MODULES.items():
        down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        up = torch.randn(fan_out, rank, generator=generator) * std
        weights[name] = (down, up)
    return weights


def lora_state(
    layout: str, seed: int = 0, rank: int = 4, alpha: float = 8.0, std: float = 0.5
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of one stand-in LoRA in `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt"}
    for name, (down, up) in random_lora(seed, rank, std).items():
        if layout == "peft":
            targets = MODULES[name][2]
            rows = up.shape[0] // len(targets)
            for n, target in enumerate(targets):
                tensors[f"transformer.{target}.lora_A.weight"] = down.clone()
                tensors[f"transformer.{target}.lora_B.weight"] = up[n * rows : (n + 1) * rows].clone()
            continue
        key = "lora_unet_" + name.replace(".", "_") if layout == "kohya" else f"diffusion_model.{name}"
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    if layout == "peft":
        config = {"r": rank, "lora_alpha": alpha, "peft_type": "LORA", "use_dora": False}
        metadata["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in config.items()})
    return tensors, metadata


def save_tiny_lora(
    path: Path, layout: str = "peft", seed: int = 0, rank: int = 4, alpha: float = 8.0, std: float = 0.5
) -> Path:
    """Write one stand-in LoRA to `path` (a `.safetensors` file); returns `path`."""
    tensors, metadata = lora_state(layout, seed, rank, alpha, std)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m models.tiny_loras OUT.safetensors [--layout kohya] [--rank 8] [--seed 1]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument("--layout", choices=LAYOUTS, default="peft")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_tiny_lora(args.out, args.layout, args.seed, args.rank, args.alpha))


if __name__ == "__main__":
    main()

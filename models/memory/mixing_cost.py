"""What a Feature Mixing pair costs against one generation of the same size: bytes and FLOPs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from models.memory.plan import plan_memory
from models.memory.sizes import T5_TOKENS, GiB, published_sizes
from models.memory.tracing import job_shape, kept_kv_bytes
from models.modes import MemoryMode, Stage


def transformer_flops(
    transformer_config: dict[str, Any], text_tokens: int, image_tokens: int, extra_keys: int = 0
) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of one FLUX transformer pass, batch 1.

    Every block, double or single, costs 24 d^2 per token in its linears (q/k/v 6, output 2, MLP 16;
    a single block's fused MLP and output the same) and 4 S (S + E) d in attention (scores and the
    weighted sum over S own keys plus E extra ones: the source keys of Feature Mixing), with d the
    model width and S = text + image tokens; plus the input and output projections. Per-sample
    modulation and the embedders are left out (well under 0.1 %).
    """
    c = transformer_config
    d = c["num_attention_heads"] * c["attention_head_dim"]
    seq = text_tokens + image_tokens
    blocks = c["num_layers"] + c["num_single_layers"]
    per_block = 24 * d * d * seq + 4 * seq * (seq + extra_keys) * d
    projections = 2 * d * (c["in_channels"] * image_tokens + c["joint_attention_dim"] * text_tokens)
    projections += 2 * d * c["in_channels"] * image_tokens  # proj_out back to the latent channels
    return blocks * per_block + projections


@dataclass(frozen=True)
class MixingCost:
    """A Feature Mixing pair against one generation of the same size: bytes and FLOPs."""

    size: int
    mode: str
    batched: bool
    noise_tokens: int
    denoise_bytes: int  # one generation's denoise activations
    mixing_denoise_bytes: int
    kept_kv_bytes: int  # of which the source's kept keys and values (sequential form)
    peak_bytes: int  # one generation's job peak in `mode`
    mixing_peak_bytes: int
    flops_per_step: int  # one generation
    mixing_flops_per_step: int

    @property
    def flops_ratio(self) -> float:
        return self.mixing_flops_per_step / self.flops_per_step

    @property
    def denoise_ratio(self) -> float:
        return self.mixing_denoise_bytes / self.denoise_bytes

    @property
    def peak_ratio(self) -> float:
        return self.mixing_peak_bytes / self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "flops_ratio": self.flops_ratio,
            "denoise_ratio": self.denoise_ratio,
            "peak_ratio": self.peak_ratio,
        }

    def format(self) -> str:
        form = "batch-2 form" if self.batched else "sequential form"
        flops, now = self.mixing_flops_per_step / 1e12, self.flops_per_step / 1e12
        act, one, kept = self.mixing_denoise_bytes / GiB, self.denoise_bytes / GiB, self.kept_kv_bytes / GiB
        peak, base = self.mixing_peak_bytes / GiB, self.peak_bytes / GiB
        return "\n".join(
            [
                f"Feature Mixing pair vs one generation at {self.size}x{self.size} "
                f"({form}, every layer mixing):",
                f"  transformer FLOPs per step: {flops:.1f} vs {now:.1f} TFLOP ({self.flops_ratio:.2f}x)",
                f"  denoise activations: {act:.2f} vs {one:.2f} GiB ({self.denoise_ratio:.1f}x; "
                f"of which kept source keys and values {kept:.2f} GiB)",
                f"  job peak in {self.mode}: {peak:.2f} vs {base:.2f} GiB ({self.peak_ratio:.3f}x)",
            ]
        )


def mixing_cost(
    mode: MemoryMode | str = "resident", size: int = 1024, *, batched: bool = False, **plan_kwargs: Any
) -> MixingCost:
    """What a Feature Mixing pair costs against one text-to-image generation of `size` in `mode`.

    `plan_kwargs` go to `plan_memory` (device, translator_device, sizes, ...).
    """
    sizes = plan_kwargs.pop("sizes", None) or published_sizes()
    one = plan_memory(mode, 0, size, sizes=sizes, **plan_kwargs)
    pair = plan_memory(mode, 0, size, sizes=sizes, feature_mixing=True, mixing_batched=batched, **plan_kwargs)
    shape = job_shape(0, size, sizes.vlm_pixels)
    tokens = shape.output_tokens
    config = sizes.transformer_config
    one_pass = transformer_flops(config, T5_TOKENS, tokens)
    return MixingCost(
        size=size,
        mode=MemoryMode(mode).value,
        batched=batched,
        noise_tokens=tokens,
        denoise_bytes=one.activations[Stage.DENOISE.value],
        mixing_denoise_bytes=pair.activations[Stage.DENOISE.value],
        kept_kv_bytes=0 if batched else kept_kv_bytes(config, tokens, itemsize=sizes.itemsize),
        peak_bytes=one.peak_bytes,
        mixing_peak_bytes=pair.peak_bytes,
        flops_per_step=one_pass,
        mixing_flops_per_step=one_pass + transformer_flops(config, T5_TOKENS, tokens, extra_keys=tokens),
    )

"""Full-size DreamOmni2 speed and memory with random weights: the baseline for the speed work.

    python bench/gpu_baseline.py                      # full-size shapes, bf16, on CUDA
    python bench/gpu_baseline.py --shapes tiny        # the same code on the tiny shapes, CPU

Builds the architectures of the `dreamomni2` preset from their configs with random weights (FLUX.1
Kontext transformer 19+38 blocks, T5-XXL, CLIP-L, the 16-channel VAE, Qwen2.5-VL-7B, two LoRAs),
nothing downloaded, and runs whole jobs through `Engine.run` for 0 to 3 input images: per-step time,
whole-job time (translator included) and peak GPU memory. Random weights measure time and memory
honestly and say nothing about quality. A random VLM rarely stops early, so the translator runs to
its token budget: the worst case of that stage. Writes a JSON report with --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig, T5Config, T5EncoderModel
from transformers import Qwen2_5_VLForConditionalGeneration as QwenVL

from api_schemas.common import Task
from api_schemas.jobs import JobParameters
from models.adapters import AdapterSet
from models.engine import Engine
from models.pipeline import DreamOmni2Pipeline
from models.settings import EngineSettings
from models.tiny import (
    FLUX_VAE_LAYOUT,
    KONTEXT_SCHEDULER_CONFIG,
    LORA_TARGET_MODULES,
    build_kontext_pipeline,
    build_qwen_tokenizer,
    build_vlm,
    ensure_tiny,
)
from models.translator import InstructionTranslator, Qwen2_5_VLImageTextProcessor

#: Published FLUX.1 Kontext [dev] transformer shape.
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
#: The published LoRAs' rank is not stated in the method doc; 64 is a common choice for Kontext LoRAs.
FULL_LORA_RANK = 64


@contextlib.contextmanager
def building_on(device: str, dtype: torch.dtype):
    """Create parameters directly on `device` in `dtype`: no fp32 copy of 12B weights on the host."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_full(
    device: str, dtype: torch.dtype, tiny_root: Path
) -> tuple[DreamOmni2Pipeline, InstructionTranslator]:
    """The full-size architectures with random weights; tokenizers come from the tiny set (ids fit)."""
    tiny = DreamOmni2Pipeline.from_pretrained(tiny_root / "kontext")
    clip_tok, t5_tok = tiny.tokenizer, tiny.tokenizer_2
    qwen_tok = build_qwen_tokenizer()
    with building_on(device, dtype):
        transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
        vae = AutoencoderKL(**FLUX_VAE)
        clip = CLIPTextModel(
            CLIPTextConfig(**CLIP_L, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)
        )
        t5 = T5EncoderModel(
            T5Config(**T5_XXL, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id)
        )
        ids = qwen_tok.convert_tokens_to_ids
        vlm = QwenVL(
            Qwen2_5_VLConfig(
                text_config=dict(
                    QWEN25_VL_7B_TEXT, eos_token_id=ids("<|im_end|>"), pad_token_id=qwen_tok.pad_token_id
                ),
                vision_config=QWEN25_VL_7B_VISION,
                image_token_id=ids("<|image_pad|>"),
                video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"),
                vision_end_token_id=ids("<|vision_end|>"),
            )
        )
    vlm.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    vlm.generation_config.pad_token_id = qwen_tok.pad_token_id
    pipeline = DreamOmni2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**KONTEXT_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=clip.eval(),
        tokenizer=clip_tok,
        text_encoder_2=t5.eval(),
        tokenizer_2=t5_tok,
        transformer=transformer.eval(),
    )
    processor = Qwen2_5_VLImageTextProcessor.from_pretrained(
        str(tiny_root / "vlm-model"), local_files_only=True
    )
    # The real processor's bounds (Qwen2.5-VL defaults), not the tiny preset's small ones.
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    return pipeline, InstructionTranslator(vlm.eval(), processor)


def build_tiny_shapes(tiny_root: Path) -> tuple[DreamOmni2Pipeline, InstructionTranslator]:
    kontext = build_kontext_pipeline()
    pipeline = DreamOmni2Pipeline(**kontext.components)
    processor = Qwen2_5_VLImageTextProcessor.from_pretrained(
        str(tiny_root / "vlm-model"), local_files_only=True
    )
    return pipeline, InstructionTranslator(build_vlm(processor.tokenizer), processor)


def add_random_loras(pipeline: DreamOmni2Pipeline, rank: int) -> AdapterSet:
    for seed, name in enumerate(AdapterSet.names.values()):
        torch.manual_seed(seed)
        pipeline.transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGET_MODULES), adapter_name=name
        )
    return AdapterSet(pipeline)


def noise_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default=None, help="default: cuda for full shapes, cpu for tiny")
    parser.add_argument("--images", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--size", type=int, default=1024, help="side of the square inputs and output")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per image count (after a warm-up)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="translator token budget")
    parser.add_argument("--no-translator", action="store_true")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args()

    full = args.shapes == "full"
    device = args.device or ("cuda" if full else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device; run with --shapes tiny on a CPU machine", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tiny_root = ensure_tiny(Path(tempfile.mkdtemp(prefix="dreamomni2-gpu-bench-")))

    started = time.perf_counter()
    pipeline, translator = build_full(device, dtype, tiny_root) if full else build_tiny_shapes(tiny_root)
    adapters = add_random_loras(pipeline, FULL_LORA_RANK if full else 4)
    # Built in the target dtype already (a cast here would make diffusers warn).
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    translator.model.to(device)
    translator.max_new_tokens = args.max_new_tokens
    settings = EngineSettings(
        preset="dreamomni2" if full else "tiny",
        device=device,
        max_area=args.size * args.size,
        bucket_scale=1.0 if full else None,
        translator=not args.no_translator,
    )
    engine = Engine(settings, pipeline, adapters, None if args.no_translator else translator)
    build_s = time.perf_counter() - started
    params_b = sum(p.numel() for p in pipeline.transformer.parameters()) / 1e9
    print(
        f"{args.shapes} shapes on {device} ({dtype}); "
        f"transformer {params_b:.2f}B params; built in {build_s:.1f}s"
    )

    def job(count: int) -> dict:
        images = [noise_image(args.size, args.size, n) for n in range(count)]
        task = Task.EDIT if count else Task.GENERATE
        params = JobParameters(
            instruction="put the hat of image 2 on the cat", task=task, steps=args.steps, seed=0
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        meta = engine.run(images, params).metadata
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        return {"job_s": seconds, "timings": meta.timings, "peak_gib": peak, "adapter": meta.adapter.value}

    job(args.images[0])  # warm-up: kernels, allocator
    rows = []
    header = (
        f"{'images':>6} {'tokens':>7} {'step s':>8} {'job s':>8} {'translate s':>11} {'peak GiB':>9}  adapter"
    )
    print(header)
    for count in args.images:
        runs = [job(count) for _ in range(args.repeats)]
        step_s = statistics.median(r["timings"]["denoise"] / args.steps for r in runs)
        job_s = statistics.median(r["job_s"] for r in runs)
        translate_s = statistics.median(r["timings"]["translate"] for r in runs)
        peak = max((r["peak_gib"] or 0.0) for r in runs)
        tokens = (args.size // 16) ** 2 * (count + 1) + 512
        rows.append(
            {"images": count, "tokens": tokens, "step_s": step_s, "job_s": job_s, "translate_s": translate_s,
             "peak_gib": peak, "adapter": runs[0]["adapter"], "timings": runs[0]["timings"]}
        )  # fmt: skip
        print(
            f"{count:>6} {tokens:>7} {step_s:>8.3f} {job_s:>8.2f} {translate_s:>11.2f} {peak:>9.1f}  "
            + runs[0]["adapter"]
        )
    if args.out:
        report = {"shapes": args.shapes, "device": device, "dtype": str(dtype), "steps": args.steps,
                  "size": args.size, "build_s": build_s, "gpu": torch.cuda.get_device_name() if
                  device.startswith("cuda") else None, "rows": rows}  # fmt: skip
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

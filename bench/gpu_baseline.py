"""Full-size DreamOmni2 speed and memory with random weights, in one memory mode.

    python bench/gpu_baseline.py                              # full-size shapes, bf16, resident, on CUDA
    python bench/gpu_baseline.py --memory low --card-gb 24    # capped at the smallest 24 GB card (L4)
    python bench/gpu_baseline.py --memory low --card A10      # capped at a named card (models/cards.py)
    python bench/gpu_baseline.py --shapes tiny                # the same code on the tiny shapes, CPU

Builds the architectures of the `dreamomni2` preset from their configs (`models.architectures`) with
random weights (FLUX.1 Kontext transformer 19+38 blocks, T5-XXL, CLIP-L, the 16-channel VAE,
Qwen2.5-VL-7B, two LoRAs), nothing downloaded, places them as the memory mode says
(`Engine.assemble`, the worker's own path) and runs whole jobs through `Engine.run` for 0 to 3 input
images: per-step time, whole-job time (translator included), peak memory (PyTorch's allocated and
reserved, and the device's used memory sampled as NVML sees it) beside the planner's prediction.
With `--card-gb` (a size class: its smallest card, `models.cards.card_class`) or `--card` (a name in
`models.cards.CARDS`), the process is capped at that card's total memory once the warm-up job has run:
`torch.cuda.set_per_process_memory_fraction` caps only PyTorch's own allocations, so the cap is the
card's total less the CUDA context already in use (the device's used memory that PyTorch did not
reserve, cuBLAS and cuDNN loaded by then), over the device's total. Random weights measure time and
memory honestly and say nothing about quality; a random VLM rarely stops early, so the translator
runs to its budget (its worst case). Run one mode per process (`bench/gpu_suite.py` does): peaks
are per process. Writes JSON with --out; with --suite-out, appends each row to the GPU suite's
results file as soon as it is measured (`bench/suite_rows.py`).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from peft import LoraConfig
from suite_rows import RowLog  # bench/, beside this script

from api_schemas.common import Task
from api_schemas.jobs import JobParameters
from models.adapters import AdapterSet
from models.architectures import LORA_TARGET_MODULES, QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, build_full_size
from models.cards import CARDS, Card, GiB, card_class
from models.engine import Engine
from models.memory import ASSUMED_LORA_RANK, plan_memory, published_sizes
from models.modes import MemoryMode
from models.pipeline import DreamOmni2Pipeline
from models.placement import Placement
from models.settings import EngineSettings
from models.tiny import KONTEXT_SCHEDULER_CONFIG, build_kontext_pipeline, build_vlm, ensure_tiny
from models.translator import InstructionTranslator, Qwen2_5_VLImageTextProcessor


def build_full(
    device: str, dtype: torch.dtype, tiny_root: Path, translator: bool = True
) -> tuple[DreamOmni2Pipeline, InstructionTranslator | None]:
    """The full-size architectures with random weights; tokenizers come from the tiny set (ids fit).
    Without `translator`, no VLM is built (None in its place)."""
    tiny = DreamOmni2Pipeline.from_pretrained(tiny_root / "kontext")
    clip_tok, t5_tok = tiny.tokenizer, tiny.tokenizer_2
    processor = Qwen2_5_VLImageTextProcessor.from_pretrained(
        str(tiny_root / "vlm-model"), local_files_only=True
    )
    qwen_tok = processor.tokenizer
    qwen_ids = {
        name: qwen_tok.convert_tokens_to_ids(name)
        for name in ("<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                     "<|video_pad|>")
    }  # fmt: skip
    models = build_full_size(
        device,
        dtype,
        clip_ids={"eos_token_id": clip_tok.eos_token_id, "pad_token_id": clip_tok.pad_token_id},
        t5_ids={"eos_token_id": t5_tok.eos_token_id, "pad_token_id": t5_tok.pad_token_id},
        qwen_ids=qwen_ids,
        translator=translator,
    )
    pipeline = DreamOmni2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**KONTEXT_SCHEDULER_CONFIG),
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=models.text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=models.transformer,
    )
    # The real processor's bounds (Qwen2.5-VL's preprocessor_config.json), not the tiny preset's.
    processor.image_processor.size = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
    return pipeline, InstructionTranslator(models.vlm, processor) if translator else None


def build_tiny_shapes(tiny_root: Path) -> tuple[DreamOmni2Pipeline, InstructionTranslator]:
    kontext = build_kontext_pipeline()
    pipeline = DreamOmni2Pipeline(**kontext.components)
    processor = Qwen2_5_VLImageTextProcessor.from_pretrained(
        str(tiny_root / "vlm-model"), local_files_only=True
    )
    return pipeline, InstructionTranslator(build_vlm(processor.tokenizer), processor)


def add_random_loras(pipeline: DreamOmni2Pipeline, rank: int, b_std: float = 0.02) -> AdapterSet:
    """Both adapters with random A and B. peft starts B at zero (a no-op adapter); a non-zero B makes
    an adapter that a profile dropped show in its output."""
    for seed, name in enumerate(AdapterSet.names.values()):
        torch.manual_seed(seed)
        pipeline.transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGET_MODULES), adapter_name=name
        )
        with torch.no_grad():
            for param_name, param in pipeline.transformer.named_parameters():
                if f"lora_B.{name}." in param_name:
                    param.normal_(0.0, b_std)
    return AdapterSet(pipeline)


def noise_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


class DeviceUsedSampler:
    """The device's used memory (what NVML reports: every allocation plus the CUDA context), sampled."""

    def __init__(self, device: str, interval_s: float = 0.02):
        self.device, self.interval_s = torch.device(device), interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak, total - free)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> DeviceUsedSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def chosen_card(args: argparse.Namespace) -> Card | None:
    if args.card_gb is not None:
        return card_class(args.card_gb)
    if args.card is not None:
        if args.card not in CARDS:
            raise SystemExit(f"--card: unknown card {args.card!r}; known: {', '.join(CARDS)}")
        return CARDS[args.card]
    return None


def cap_at_card(card: Card, device: str) -> dict:
    """Cap this process at `card`'s total memory, the CUDA context already in use counted."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    context = (total - free) - torch.cuda.memory_reserved(device)
    fraction = min(1.0, max(0.0, (card.total_bytes - context) / total))
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    print(
        f"capped at {card.label()}: the CUDA context holds {context / GiB:.2f} GiB, so PyTorch may use "
        f"{fraction * total / GiB:.2f} GiB ({fraction:.3f} of the device's {total / GiB:.1f} GiB)"
    )
    return {"name": card.name, "sold_gb": card.sold_gb, "total_gib": round(card.total_gib, 2),
            "total_bytes": card.total_bytes, "device_total_bytes": total, "context_bytes": context,
            "fraction": fraction, "pytorch_cap_bytes": int(fraction * total)}  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default=None, help="default: cuda for full shapes, cpu for tiny")
    parser.add_argument("--memory", choices=[m.value for m in MemoryMode], default=MemoryMode.RESIDENT.value)
    card = parser.add_mutually_exclusive_group()
    card.add_argument(
        "--card-gb", type=int, help="cap at the smallest card sold as this many GB (24, 48, 80)"
    )
    card.add_argument("--card", help=f"cap at this card: {', '.join(CARDS)}")
    parser.add_argument("--images", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--size", type=int, default=1024, help="side of the square inputs and output")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per image count (after a warm-up)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="translator token budget")
    parser.add_argument("--no-translator", action="store_true")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--suite-out", type=Path, help="append each row to this GPU suite results file")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    card = chosen_card(args)

    full = args.shapes == "full"
    device = args.device or ("cuda" if full else "cpu")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device; run with --shapes tiny on a CPU machine", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if cuda else torch.float32
    tiny_root = ensure_tiny(Path(tempfile.mkdtemp(prefix="dreamomni2-gpu-bench-")))
    mode = MemoryMode(args.memory)
    section = f"memory {mode.value}"
    suite = RowLog(args.suite_out) if args.suite_out else None

    started = time.perf_counter()
    # Built on the device (fast random init); the placement then moves what the mode keeps in host
    # memory there, and the process is capped at the card size once the warm-up job has run.
    pipeline, translator = build_full(device, dtype, tiny_root) if full else build_tiny_shapes(tiny_root)
    adapters = add_random_loras(pipeline, ASSUMED_LORA_RANK if full else 4)
    translator.max_new_tokens = args.max_new_tokens
    settings = EngineSettings(
        preset="dreamomni2" if full else "tiny",
        device=device,
        memory=mode,
        max_area=args.size * args.size,
        bucket_scale=args.size / 1024 if full else None,
        translator=not args.no_translator,
    )
    translator_device = None if args.no_translator else device
    placement = Placement(mode, device, translator_device)
    engine = Engine.assemble(
        settings, pipeline, adapters, None if args.no_translator else translator, placement
    )
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - started
    params_b = sum(p.numel() for p in pipeline.transformer.parameters()) / 1e9
    print(
        f"{args.shapes} shapes on {device} ({dtype}), memory {mode.value}; "
        f"transformer {params_b:.2f}B params; built and placed in {build_s:.1f}s"
    )
    if suite:
        suite.append(
            section, "build", {"build_s": build_s, "transformer_params_b": params_b, "device": device}
        )

    def job(count: int) -> dict:
        images = [noise_image(args.size, args.size, n) for n in range(count)]
        task = Task.EDIT if count else Task.GENERATE
        params = JobParameters(
            instruction="put the hat of image 2 on the cat", task=task, steps=args.steps, seed=0
        )
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        if cuda:
            with DeviceUsedSampler(device) as sampler:
                meta = engine.run(images, params).metadata
            used = sampler.peak
        else:
            meta, used = engine.run(images, params).metadata, None
        seconds = time.perf_counter() - started
        allocated = torch.cuda.max_memory_allocated() if cuda else None
        reserved = torch.cuda.max_memory_reserved() if cuda else None
        return {"job_s": seconds, "timings": meta.timings, "allocated": allocated, "reserved": reserved,
                "device_used": used, "adapter": meta.adapter.value}  # fmt: skip

    sizes = published_sizes(ASSUMED_LORA_RANK) if full else None
    job(args.images[0])  # warm-up: kernels, allocator, cuBLAS and cuDNN loaded (the context grows)
    capped = cap_at_card(card, device) if cuda and card else None
    if capped and suite:
        suite.append(section, "card", capped)
    rows = []
    header = (
        f"{'images':>6} {'tokens':>7} {'step s':>8} {'job s':>8} {'translate s':>11} "
        f"{'planned GiB':>11} {'alloc GiB':>9} {'reserved GiB':>12} {'used GiB':>8}  adapter"
    )
    print(header)
    for count in args.images:
        runs = [job(count) for _ in range(args.repeats)]
        step_s = statistics.median(r["timings"]["denoise"] / args.steps for r in runs)
        job_s = statistics.median(r["job_s"] for r in runs)
        translate_s = statistics.median(r["timings"]["translate"] for r in runs)
        peak = {key: max((r[key] or 0) for r in runs) for key in ("allocated", "reserved", "device_used")}
        planned = (
            plan_memory(mode, count, args.size, device=device, translator_device=translator_device,
                        new_tokens=args.max_new_tokens, sizes=sizes).peak_bytes
            if full else 0
        )  # fmt: skip
        tokens = (args.size // 16) ** 2 * (count + 1) + 512
        row = {"images": count, "tokens": tokens, "step_s": step_s, "job_s": job_s,
               "translate_s": translate_s, "planned_bytes": planned,
               **{f"peak_{k}_bytes": v for k, v in peak.items()}, "adapter": runs[0]["adapter"],
               "timings": runs[0]["timings"]}  # fmt: skip
        if capped:
            row["fits_card"] = peak["device_used"] <= card.total_bytes
        rows.append(row)
        if suite:
            suite.append(section, f"{count} image(s)", row)
        measured = f"{peak['allocated'] / GiB:>9.2f} {peak['reserved'] / GiB:>12.2f} "
        measured += f"{peak['device_used'] / GiB:>8.2f}"
        print(
            f"{count:>6} {tokens:>7} {step_s:>8.3f} {job_s:>8.2f} {translate_s:>11.2f} "
            f"{planned / GiB:>11.2f} {measured}  " + runs[0]["adapter"],
            flush=True,
        )
    if args.out:
        report = {"shapes": args.shapes, "device": device, "dtype": str(dtype), "memory": mode.value,
                  "card": capped, "steps": args.steps, "size": args.size, "build_s": build_s,
                  "gpu": torch.cuda.get_device_name() if cuda else None, "rows": rows}  # fmt: skip
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

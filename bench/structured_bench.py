"""What structured decoding (the text tasks' JSON constraint, `models.structured`) costs per token.

    python bench/structured_bench.py [--repeats 5]

1. The tiny preset's VLM writing a judge's answer: greedy decoding under the verdict's schema against
   the same number of tokens decoded freely (`min_new_tokens` forces the length), interleaved in each
   repeat. Prints the median time per token of each and their ratio. The tiny model makes a step
   cheap, so the constraint's share is as large here as it gets; on the 7B model a step costs tens
   of milliseconds.
2. The masking alone at Qwen2.5-VL's logits width (152,064): the bitmask unpacked and applied to one
   step's logits, on CUDA when visible, else on this CPU. llguidance's own mask computation depends on
   the real tokenizer's vocabulary, which is not on this machine; it is inside the times of part 1 for
   the tiny one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from api_schemas.text_tasks import judge_answer_schema, judge_prompt
from models.structured import JsonDecoding
from models.text_jobs import generate_json
from models.tiny import VLM_DIRNAME, ensure_tiny
from models.translator import InstructionTranslator

#: The logits width of Qwen2.5-VL-7B (its vocabulary, padded).
QWEN_VOCAB = 152_064


def tiny_decoding(repeats: int, cache: Path) -> None:
    translator = InstructionTranslator.from_pretrained(ensure_tiny(cache) / VLM_DIRNAME)
    text, schema = judge_prompt("make the bag in image 1 red", 0), judge_answer_schema()

    def constrained() -> tuple[float, int]:
        started = time.perf_counter()
        _, tokens = generate_json(translator, [], text, schema, lambda *a, **k: None, lambda: False)
        return time.perf_counter() - started, tokens

    chat = translator.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": text}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = translator.processor(text=[chat], return_tensors="pt")

    def free(tokens: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            translator.model.generate(**inputs, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens)
        return time.perf_counter() - started

    _, tokens = constrained()  # warm-up, and the answer's length
    free(tokens)
    runs = [(constrained()[0], free(tokens)) for _ in range(repeats)]
    with_ms = statistics.median(c for c, _ in runs) / tokens * 1e3
    without_ms = statistics.median(f for _, f in runs) / tokens * 1e3
    print(f"tiny VLM, a judge's answer of {tokens} tokens, median of {repeats}:")
    ratio = with_ms / without_ms
    print(f"  constrained {with_ms:.3f} ms/token, free {without_ms:.3f} ms/token, ratio {ratio:.2f}")


def masking_alone(repeats: int, cache: Path) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    translator = InstructionTranslator.from_pretrained(ensure_tiny(cache) / VLM_DIRNAME)
    # The tiny tokenizer with Qwen's logits width (the ids past its own are never allowed): the mask
    # llguidance fills, its unpacking and the fill of the logits all take that width.
    decoding = JsonDecoding(
        translator.processor.tokenizer, QWEN_VOCAB, [translator.processor.tokenizer.eos_token_id]
    )
    answer = (
        '{"instruction_following":4,"consistency":5,"absence_of_distortion":3,"reason":"The bag is red."}'
    )
    tokens = translator.processor.tokenizer.encode(answer, add_special_tokens=False)
    ids = torch.tensor([[0, *tokens]], device=device)
    scores = torch.randn(1, QWEN_VOCAB, device=device)
    per_step = []
    for _ in range(repeats + 1):
        processor = LogitsProcessorList([decoding.processor(judge_answer_schema())])
        started = time.perf_counter()
        # Step k sees the answer's first k tokens: the matcher takes the last, then masks the next.
        for k in range(1, len(tokens) + 1):
            processor(ids[:, :k], scores)
        if device == "cuda":
            torch.cuda.synchronize()
        per_step.append((time.perf_counter() - started) / len(tokens))
    median_ms = statistics.median(per_step[1:]) * 1e3  # the first is a warm-up
    print(f"masking {QWEN_VOCAB} logits on {device}, a judge's answer of {len(tokens)} tokens: "
          f"median {median_ms:.3f} ms per step")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, help="where the tiny preset is (built there if missing)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache or Path(scratch)
        tiny_decoding(args.repeats, cache)
        masking_alone(args.repeats, cache)


if __name__ == "__main__":
    main()

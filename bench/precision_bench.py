"""Numerical cost of the `low` memory mode's fp8 storage and of the `compiled` profile's LoRA folding.

    python bench/precision_bench.py                       # full-size FLUX layer shapes, CPU
    python bench/precision_bench.py --shapes small --repeats 1 --out precision.json

Both on synthetic FLUX-like tensors (weights normal with the stated std, one row in 50 Student-t with
3 degrees of freedom; activations of std 1 with one channel in 100 ten times larger), stored and
computed in bf16 as the worker does. Every figure is the median over `--repeats` seeds.

(a) fp8 storage, per layer, against the same layer in bf16 (the baseline, measured in this run):
  * `plain`: diffusers' layerwise casting, a cast to float8_e4m3fn with no scale;
  * `scaled`: `models.fp8`, fp8 with one fp32 scale per output row;
  * error: ||y - y_bf16|| / ||y_bf16|| over a batch of tokens; flushed: the fraction of nonzero
    weights stored as zero; `plain/scaled`: the ratio of the two errors;
  * `int8 rows`: an int8 store with per-row scales, the same bytes, for comparison only.

(b) LoRA folding, what `compiled` does (`FusedAdapters`: W = W0 + s * B @ A, in place, in bf16)
against the unfused path (bf16 base matmul plus the bf16 LoRA side path, as peft runs it), both
against an fp64 reference computed from the same stored bf16 tensors:
  * `fused` / `unfused`: ||y - y_fp64|| / ||y_fp64||; `fused-unfused`: ||y_fused - y_unfused|| /
    ||y_fp64||; `lora effect`: ||x dW^T|| / ||y_fp64||, the size of what the LoRA does;
  * `weight`: ||W_fused - (W0 + s B A)|| / ||W0 + s B A||, the folded weight's own rounding;
  * `delta lost`: ||(W_fused - W0) - s B A|| / ||s B A||, the same error as a part of the delta;
  * `rounded away`: the fraction of the delta's elements whose folded change is off from the exact
    delta by more than half of it (|(W_fused - W0) - d| > |d| / 2; mostly elements with |d| below
    half a bf16 step of their weight, which the fold drops to 0 or rounds to a whole step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.fp8 import dequantize, quantize_rows

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16

#: (out, in) of FLUX.1's stored Linears: attention projections, the MLP's two halves, a single
#: block's output projection (attention and MLP concatenated).
FP8_SHAPES = {
    "full": [(3072, 3072), (12288, 3072), (3072, 12288), (3072, 15360)],
    "small": [(256, 256), (1024, 256)],
}
#: The LoRAs adapt the attention projections (3072 x 3072 in FLUX.1).
LORA_SHAPES = {"full": [(3072, 3072)], "small": [(256, 256)]}
WEIGHT_STDS = (0.01, 0.02, 0.05)
LORA_RANKS = (16, 64)
#: rms(s B A) / rms(W0): the size of a trained LoRA's update next to the weight it adapts.
LORA_DELTAS = (0.01, 0.03, 0.1)
TOKENS = {"full": 256, "small": 64}


def flux_like_weight(out_features: int, in_features: int, std: float, gen: torch.Generator) -> torch.Tensor:
    """A bf16 weight: normal with `std`, one row in 50 Student-t(3) rescaled to the same std."""
    weight = torch.randn(out_features, in_features, generator=gen) * std
    heavy = torch.randperm(out_features, generator=gen)[: max(1, out_features // 50)]
    chi2 = torch.randn(3, len(heavy), in_features, generator=gen).square().sum(0)
    student = torch.randn(len(heavy), in_features, generator=gen) / (chi2 / 3).sqrt()
    weight[heavy] = student / 3**0.5 * std
    return weight.to(BF16)


def activations(tokens: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    """bf16 inputs of std 1, one channel in 100 ten times larger."""
    x = torch.randn(tokens, in_features, generator=gen)
    x[:, torch.randperm(in_features, generator=gen)[: max(1, in_features // 100)]] *= 10
    return x.to(BF16)


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    return ((value.double() - reference).norm() / reference.norm()).item()


def flushed(codes: torch.Tensor, weight: torch.Tensor) -> float:
    """Fraction of `weight`'s nonzero elements whose fp8 code is zero (bytes 0x00 / 0x80: +0 / -0)."""
    zero_codes = torch.bincount(codes.view(torch.uint8).flatten(), minlength=256)[[0x00, 0x80]].sum()
    nonzero = torch.count_nonzero(weight)
    return (zero_codes - (weight.numel() - nonzero)).item() / nonzero.item()


def int8_rows(weight: torch.Tensor) -> torch.Tensor:
    """The weight after an int8 store with one absmax scale per row, back in bf16."""
    wide = weight.float()
    scale = wide.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127
    return ((wide / scale).round().clamp(-127, 127) * scale).to(BF16)


def fp8_row(shape: tuple[int, int], std: float, tokens: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    weight = flux_like_weight(*shape, std, gen)
    x = activations(tokens, shape[1], gen)
    plain_codes = weight.to(FP8)
    codes, scale = quantize_rows(weight)
    with torch.no_grad():
        bf16 = F.linear(x, weight)
        plain = F.linear(x, plain_codes.to(BF16))
        scaled = F.linear(x, dequantize(codes, scale, BF16))
        int8 = F.linear(x, int8_rows(weight))
    plain_error, scaled_error = relative(plain, bf16), relative(scaled, bf16)
    return {
        "plain_error": plain_error,
        "plain_flushed": flushed(plain_codes, weight),
        "scaled_error": scaled_error,
        "scaled_flushed": flushed(codes, weight),
        "plain_over_scaled": plain_error / scaled_error,
        "int8_rows_error": relative(int8, bf16),
    }


def lora_row(shape: tuple[int, int], rank: int, delta: float, tokens: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    std = 0.02
    w0 = flux_like_weight(out_features, in_features, std, gen)
    x = activations(tokens, in_features, gen)
    scale = 1.0  # lora_alpha == rank; the update's size is in B
    a = (torch.randn(rank, in_features, generator=gen) / in_features**0.5).to(BF16)
    # Each element of B A sums `rank` products, so rms(B A) = rms(B) * rms(A) * sqrt(rank); with
    # rms(A) = in^-1/2, rms(B) below gives rms(s B A) = delta * std.
    b = (torch.randn(out_features, rank, generator=gen) * delta * std / (rank / in_features) ** 0.5).to(BF16)

    exact_delta = scale * (b.double() @ a.double())
    exact = F.linear(x.double(), w0.double() + exact_delta)
    with torch.no_grad():
        fused_weight = w0.clone().addmm_(b, a, alpha=scale)  # what FusedAdapters.activate does
        fused = F.linear(x, fused_weight)
        unfused = F.linear(x, w0) + F.linear(F.linear(x, a), b) * scale  # peft's lora.Linear
    change = fused_weight.double() - w0.double()
    off = (change - exact_delta).abs()
    return {
        "lora_effect": (F.linear(x.double(), exact_delta).norm() / exact.norm()).item(),
        "fused_error": relative(fused, exact),
        "unfused_error": relative(unfused, exact),
        "fused_vs_unfused": ((fused.double() - unfused.double()).norm() / exact.norm()).item(),
        "weight_error": (off.norm() / (w0.double() + exact_delta).norm()).item(),
        "delta_lost": (off.norm() / exact_delta.norm()).item(),
        "rounded_away": (off > exact_delta.abs() / 2).double().mean().item(),
        "measured_delta": (exact_delta.pow(2).mean().sqrt() / w0.double().pow(2).mean().sqrt()).item(),
    }


def median_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def run(shapes: str, repeats: int) -> dict[str, Any]:
    tokens = TOKENS[shapes]
    fp8 = []
    for shape in FP8_SHAPES[shapes]:
        for std in WEIGHT_STDS:
            rows = [fp8_row(shape, std, tokens, seed) for seed in range(repeats)]
            fp8.append({"shape": list(shape), "std": std, **median_rows(rows)})
    lora = []
    for shape in LORA_SHAPES[shapes]:
        for rank in LORA_RANKS:
            for delta in LORA_DELTAS:
                rows = [lora_row(shape, rank, delta, tokens, seed) for seed in range(repeats)]
                lora.append({"shape": list(shape), "rank": rank, "delta": delta, **median_rows(rows)})
    return {"shapes": shapes, "repeats": repeats, "tokens": tokens, "fp8": fp8, "lora": lora}


def print_report(report: dict[str, Any], seconds: float) -> None:
    print(
        f"precision on the CPU, {report['tokens']} tokens per layer, median of {report['repeats']} "
        f"seed(s), {seconds:.1f} s"
    )
    print("\n(a) fp8 storage vs the bf16 layer (relative output error; flushed: nonzero weights stored as 0)")
    print(
        f"{'out x in':>13} {'w std':>6} {'plain':>8} {'flushed':>8} {'scaled':>8} {'flushed':>9} "
        f"{'plain/scaled':>12} {'int8 rows':>9}"
    )
    for row in report["fp8"]:
        shape = "x".join(map(str, row["shape"]))
        print(
            f"{shape:>13} {row['std']:>6.3f} {row['plain_error']:>7.2%} {row['plain_flushed']:>8.2%} "
            f"{row['scaled_error']:>7.2%} {row['scaled_flushed']:>9.1e} {row['plain_over_scaled']:>11.2f}x "
            f"{row['int8_rows_error']:>8.2%}"
        )
    print(
        "\n(b) LoRA folded into bf16 weights (compiled) vs unfused (reference), against fp64 "
        "(relative output error)"
    )
    print(
        f"{'out x in':>13} {'rank':>4} {'delta':>5} {'lora effect':>11} {'fused':>9} {'unfused':>9} "
        f"{'fused/unfused':>13} {'fused-unfused':>13} {'weight':>8} {'delta lost':>10} {'rounded away':>12}"
    )
    for row in report["lora"]:
        shape = "x".join(map(str, row["shape"]))
        print(
            f"{shape:>13} {row['rank']:>4} {row['delta']:>5.2f} {row['lora_effect']:>11.2%} "
            f"{row['fused_error']:>9.2e} {row['unfused_error']:>9.2e} "
            f"{row['fused_error'] / row['unfused_error']:>12.2f}x {row['fused_vs_unfused']:>13.2e} "
            f"{row['weight_error']:>8.1e} "
            f"{row['delta_lost']:>10.2%} {row['rounded_away']:>12.2%}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="seeds per row (the median is printed)")
    parser.add_argument("--shapes", choices=sorted(FP8_SHAPES), default="full")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    report = run(args.shapes, args.repeats)
    print_report(report, time.perf_counter() - started)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

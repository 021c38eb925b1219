"""The GPU suite's summary: the results file (`bench/suite_rows.py`'s rendering) as a few tables.

Reads whatever rows are there: a section that failed or timed out shows its status and the rows it
recorded before. Free of torch. `python bench/suite_summary.py out/suite.json` prints a saved file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GiB = 1024**3


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def versions(smoke: dict[str, Any]) -> list[str]:
    lines = []
    found = smoke.get("versions") or {}
    gpu = found.get("gpu")
    torch = found.get("torch") or {}
    lines.append(
        f"python {found.get('python', '?')}, torch {torch.get('version', '?')} (CUDA {torch.get('cuda')}), "
        + (f"{gpu['name']} (sm {gpu['capability']}, {gpu['total_bytes'] / GiB:.1f} GiB)" if gpu else "no GPU")
    )
    names = ["diffusers", "transformers", "peft", "accelerate", "tokenizers", "safetensors",
             "huggingface-hub", "numpy", "pillow", "pydantic", "pydantic-core", "torchao",
             "torchao (fp8 site)", "triton"]  # fmt: skip
    present = [f"{n} {found[n]['version']}" for n in names if isinstance(found.get(n), dict)]
    lines.append(", ".join(present))
    if "error" in found:
        lines.append(f"smoke test error: {found['error']}")
    return lines


def profile_rows(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"{'transformer per step':<22} {'ms/step':>8} {'x eager':>8} {'TFLOP/s':>8} {'rel err':>9}"]
    for section in ("compiled", "fp8"):
        found = rows.get(section) or {}
        for name, row in found.items():
            if "step_s" not in row:
                continue
            label = f"{name} ({section})" if name.startswith("eager") else name
            error = f"{row['relative_error']:>9.2e}" if "relative_error" in row else f"{'-':>9}"
            speedup = f"{row['speedup']:>8.2f}" if "speedup" in row else f"{1:>8.2f}"
            lines.append(f"{label:<22} {row['step_s'] * 1000:>8.1f} {speedup} {row['tflops']:>8.1f} {error}")
        for name in ("compile cold", "compile warm", "profile", "torchao"):
            row = found.get(name)
            if row is None:
                continue
            if "skipped" in row:
                lines.append(f"{section} {name}: skipped ({row['skipped']})")
            elif name.startswith("compile"):
                lines.append(f"{section} {name}: {row['seconds']:.1f}s")
            elif name == "torchao":
                lines.append(f"{section} torchao {row['version']} with torch {row['torch']}")
            else:
                lines.append(f"{section}: attention {row['attention_backend']}, {row['fused_targets']} fused "
                             f"LoRA targets, {row['fp8_linears']} fp8 linears")  # fmt: skip
    return lines if len(lines) > 1 else []


def memory_rows(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for section, found in rows.items():
        if not section.startswith("memory "):
            continue
        card = found.get("card")
        cap = (
            f", capped at {card['name']} {card['sold_gb']} GB ({card['total_gib']:.1f} GiB, context "
            f"{card['context_bytes'] / GiB:.2f} GiB)"
            if card
            else ""
        )
        lines.append(f"{section}{cap}")
        for row in found.values():
            if "images" not in row:
                continue
            fits = "" if "fits_card" not in row else ("  fits" if row["fits_card"] else "  DOES NOT FIT")
            lines.append(
                f"   {row['images']} image(s): step {row['step_s']:.3f}s, job {row['job_s']:.2f}s; GiB "
                "planned "
                f"{gib(row['planned_bytes'])}, allocated {gib(row['peak_allocated_bytes'])}, reserved "
                f"{gib(row['peak_reserved_bytes'])}, device used {gib(row['peak_device_used_bytes'])}{fits}"
            )
    return lines


def print_summary(results: dict[str, Any]) -> None:
    rows, sections = results.get("rows") or {}, results.get("sections") or {}
    print("\n== summary")
    for line in versions(rows.get("smoke") or {}):
        print(line)
    for section, outcome in sections.items():
        print(f"section {section:<18} {outcome['status']} ({outcome.get('seconds', 0):.0f}s"
              + (f" of {outcome['timeout_s']}s)" if "timeout_s" in outcome else ")"))  # fmt: skip
    matmul = rows.get("matmul") or {}
    if "dense" in matmul:
        fp8 = matmul.get("fp8") or {}
        print(f"matmul: {matmul['dense']['tflops']:.1f} TFLOP/s ({matmul['dense']['dtype']})"
              + (f", fp8 {fp8['tflops']:.1f}" if "tflops" in fp8 else ""))  # fmt: skip
    for name, row in (rows.get("reference") or {}).items():
        if name == "build":
            print(f"reference build: {row['build_s']:.1f}s")
        elif "skipped" in row:
            print(f"reference {name}: skipped ({row['skipped']})")
        else:
            print(f"reference {name:<26} job {row['job_s']:.2f}s, {row['step_s']:.3f}s/step, translate "
                  f"{row['translate_s']:.2f}s, {row['evaluations']} evaluations, "
                  f"adapter {row['adapter']}")  # fmt: skip
    for line in profile_rows(rows) + memory_rows(rows):
        print(line)


if __name__ == "__main__":
    print_summary(json.loads(Path(sys.argv[1]).read_text()))

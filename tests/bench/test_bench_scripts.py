"""The bench scripts keep working: each runs on the tiny shapes on CPU with a short budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_gpu_baseline_runs_on_tiny_shapes(tmp_path):
    out = tmp_path / "report.json"
    stdout = run_script(
        "bench/gpu_baseline.py", "--shapes", "tiny", "--size", "64", "--steps", "2",
        "--images", "0", "1", "2", "3", "--max-new-tokens", "4", "--out", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert [row["images"] for row in report["rows"]] == [0, 1, 2, 3]
    assert [row["adapter"] for row in report["rows"]] == ["base", "base", "edit", "edit"]
    assert all(row["step_s"] > 0 and row["job_s"] >= row["timings"]["denoise"] for row in report["rows"])
    assert "peak GiB" in stdout


def test_engine_bench_prints_ratios(tmp_path):
    stdout = run_script(
        "bench/engine_bench.py", "--repeats", "1", "--steps", "2", "--cache-dir", str(tmp_path)
    )
    assert "ratio" in stdout
    lines = [line.split() for line in stdout.splitlines()]
    image_rows = [row for row in lines if len(row) == 5 and row[0].isdigit()]
    assert [row[0] for row in image_rows] == ["0", "1", "2", "3", "4", "5"]
    assert all(float(row[3]) > 0 for row in image_rows)

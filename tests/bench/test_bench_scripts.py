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
    assert "planned GiB" in stdout and "reserved GiB" in stdout


def test_gpu_suite_runs_a_mode_in_its_own_process(tmp_path):
    run_script(
        "bench/gpu_suite.py", "--shapes", "tiny", "--modes", "low", "--images", "0", "--steps", "1",
        "--max-new-tokens", "2", "--out-dir", str(tmp_path),
    )  # fmt: skip
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["low"]["status"] == "ok" and suite["low"]["report"]["memory"] == "low"


def test_memory_modes_bench_prints_ratios_and_differences(tmp_path):
    stdout = run_script(
        "bench/memory_modes.py", "--repeats", "1", "--steps", "2", "--cache-dir", str(tmp_path)
    )
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.split()[:1]
            and line.split()[0] in {"resident", "balanced", "low", "stream"}}  # fmt: skip
    assert set(rows) == {"resident", "balanced", "low", "stream"}
    assert float(rows["resident"][2]) == 1.0
    # Exact modes: no difference at all; fp8: a small one.
    assert rows["balanced"][3:] == rows["stream"][3:] == ["0.000", "/", "0"] * 3
    assert 0 < float(rows["low"][3]) < 3


def test_engine_bench_prints_ratios(tmp_path):
    stdout = run_script(
        "bench/engine_bench.py", "--repeats", "1", "--steps", "2", "--cache-dir", str(tmp_path)
    )
    assert "ratio" in stdout
    lines = [line.split() for line in stdout.splitlines()]
    image_rows = [row for row in lines if len(row) == 5 and row[0].isdigit()]
    assert [row[0] for row in image_rows] == ["0", "1", "2", "3", "4", "5"]
    assert all(float(row[3]) > 0 for row in image_rows)

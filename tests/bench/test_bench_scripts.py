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


def test_gpu_suite_runs_every_section_on_tiny_shapes(tmp_path, tiny_cache):
    out = tmp_path / "suite.json"
    # The compile cache the in-process speed tests use too: one cold compile per test run.
    stdout = run_script(
        "bench/gpu_suite.py", "--shapes", "tiny", "--out", str(out), "--steps", "4", "--repeats", "1",
        "--memory-modes", "low", "--compile-cache", str(tiny_cache / "torch-compile"),
    )  # fmt: skip
    suite = json.loads(out.read_text())
    assert suite["matmul"]["tflops"] > 0 and suite["build"]["build_s"] > 0
    assert set(suite["reference_jobs"]["images"]) == {"1", "2"}
    assert suite["cache_step"]["full_step_s"] > 0 and suite["cache_step"]["predicted_step_s"] > 0
    profiles = suite["profiles"]
    tokens = list(profiles["flops"])
    assert set(profiles["rows"]) == {f"{p} {t}" for p in ("reference", "compiled") for t in tokens}
    assert all(profiles["rows"][f"reference {t}"]["relative_error"] == 0 for t in tokens)
    assert all(profiles["rows"][f"compiled {t}"]["relative_error"] < 1e-5 for t in tokens)
    assert profiles["fused_targets"] > 0 and profiles["fp8_linears"] == 0  # no fp8 on a CPU
    for caches in profiles["jobs"].values():
        assert caches["none"]["evaluations"] == caches["first_block"]["evaluations"] == 4
        assert caches["taylorseer"]["evaluations"] < 4
    assert {"cold_s", "warm_s"} <= set(profiles["compile"]["compiled"])
    assert suite["memory_modes"]["low"]["status"] == "ok"
    assert [row["images"] for row in suite["memory_modes"]["low"]["rows"]] == [0, 2]
    summary = stdout[stdout.index("== summary") :]
    assert "compiled + taylorseer" in summary and "memory low" in summary


def test_speed_bench_prints_each_profile_and_cache_against_reference(tiny_cache):
    stdout = run_script(
        "bench/speed_bench.py", "--repeats", "1", "--steps", "4", "--cache-dir", str(tiny_cache)
    )
    rows = {
        tuple(line.split()[:2]): line.split()
        for line in stdout.splitlines()
        if line.split()[:1] in (["reference"], ["compiled"])
    }
    assert set(rows) == {
        (p, c) for p in ("reference", "compiled") for c in ("none", "first_block", "taylorseer")
    }
    # columns: profile cache ready restart job x-job step x-step evals diff-mean diff-max
    assert rows["reference", "none"][5] == "1.00" and rows["reference", "none"][9:] == ["0.000", "0"]
    assert rows["reference", "none"][3] == "-" and float(rows["compiled", "none"][3]) > 0
    assert float(rows["compiled", "none"][10]) <= 2  # lossless: within 2 levels of reference
    assert rows["reference", "first_block"][8] == "4" and int(rows["compiled", "taylorseer"][8]) < 4


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


def test_mixing_bench_prints_the_pair_against_two_generations(tiny_cache):
    stdout = run_script(
        "bench/mixing_bench.py", "--repeats", "1", "--steps", "2", "--cache-dir", str(tiny_cache)
    )
    rows = {line[:18].strip(): line[18:].split() for line in stdout.splitlines() if line[:2] in ("2 ", "pa")}
    assert set(rows) == {"2 x ordinary", "pair, two passes", "pair, batch 2"}
    # columns: job s, ratio, denoise s, ratio, transformer calls, source diff max (8-bit levels)
    assert rows["2 x ordinary"][1] == "1.00" and rows["2 x ordinary"][4] == "4"
    assert rows["pair, two passes"][4] == "4" and rows["pair, two passes"][5] == "0"  # bit-identical source
    assert rows["pair, batch 2"][4] == "2" and float(rows["pair, batch 2"][1]) > 0
    assert "Feature Mixing pair / two ordinary generations:" in stdout

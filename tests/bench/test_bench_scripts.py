"""The bench scripts keep working: each runs on the tiny shapes on CPU with a short budget."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
import zipfile
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


def suite(tmp_path: Path, tiny_cache: Path, *args: str) -> tuple[dict, str]:
    """One tiny call of bench/gpu_suite.py: its results file and its output."""
    out = tmp_path / "suite.json"
    # The compile cache the in-process speed tests use too: one cold compile per test run. This
    # machine imports more slowly than the GPU machine the 10 s smoke timeout is meant for.
    stdout = run_script(
        "bench/gpu_suite.py", "--shapes", "tiny", "--out", str(out), "--steps", "4", "--repeats", "1",
        "--tokens", "8", "--compile-cache", str(tiny_cache / "torch-compile"), "--smoke-timeout-s", "60",
        *args,
    )  # fmt: skip
    results = json.loads(out.read_text())
    assert all(outcome["status"] == "ok" for outcome in results["sections"].values()), results["sections"]
    # Every row was appended as measured, one JSON line each, and the results file renders them all.
    lines = [json.loads(line) for line in (tmp_path / "suite.rows.jsonl").read_text().splitlines()]
    rows = [line for line in lines if line["kind"] == "row"]
    assert sum(len(found) for found in results["rows"].values()) == len(rows)
    return results, stdout


def test_gpu_suite_call_1_measures_matmul_and_the_eager_reference_on_tiny_shapes(tmp_path, tiny_cache):
    # Call 1 in two tests (`--sections`), each well under a minute here.
    results, stdout = suite(tmp_path, tiny_cache, "--call", "1", "--sections", "matmul", "reference")
    assert list(results["sections"]) == ["smoke", "matmul", "reference"]
    assert results["suite"]["call 1"]["sections"] == ["matmul", "reference"]
    rows = results["rows"]
    versions = rows["smoke"]["versions"]
    assert {"torch", "diffusers", "transformers", "peft", "pydantic", "pydantic-core", "numpy"} <= set(
        versions
    )
    assert versions["gpu"] is None and "error" not in versions
    assert rows["matmul"]["dense"]["tflops"] > 0 and "skipped" in rows["matmul"]["fp8"]  # no fp8 on a CPU
    reference = rows["reference"]
    assert reference["build"]["translator"] is True
    assert [reference[f"job {n} image(s)"]["evaluations"] for n in (1, 2)] == [4, 4]
    assert [reference[f"job {n} image(s)"]["adapter"] for n in (1, 2)] == ["base", "edit"]
    assert reference["job 2 image(s), first_block"]["evaluations"] == 4
    assert reference["job 2 image(s), taylorseer"]["evaluations"] < 4
    summary = stdout[stdout.index("== summary") :]
    assert "section reference" in summary and "reference job 2 image(s), taylorseer" in summary


def test_gpu_suite_call_1_measures_the_compiled_profile_on_tiny_shapes(tmp_path, tiny_cache):
    results, stdout = suite(tmp_path, tiny_cache, "--call", "1", "--sections", "compiled")
    assert list(results["sections"]) == ["smoke", "compiled"]
    compiled = results["rows"]["compiled"]
    labels = [name.split()[1] for name in compiled if name.startswith("eager ")]
    assert len(labels) == 2 and compiled["compile preflight"]["problem"] is None
    for label in labels:
        assert compiled[f"eager {label}"]["flops"] > 0
        assert compiled[f"compiled {label}"]["relative_error"] < 1e-5  # fused and compiled: close
    # Dynamic shapes: the second token count compiles nothing new.
    assert compiled[f"compiled {labels[0]}"]["graphs"] == compiled[f"compiled {labels[1]}"]["graphs"] > 0
    assert compiled["profile"]["fused_targets"] > 0 and compiled["compile cold"]["seconds"] > 0
    assert "seconds" in compiled["compile warm"] or "skipped" in compiled["compile warm"]
    summary = stdout[stdout.index("== summary") :]
    assert "section compiled" in summary and f"compiled {labels[1]}" in summary


def test_gpu_suite_call_2_runs_fp8_and_memory_modes_on_tiny_shapes(tmp_path, tiny_cache):
    results, stdout = suite(tmp_path, tiny_cache, "--call", "2", "--memory-modes", "low")
    assert list(results["sections"]) == ["smoke", "fp8", "memory low"]
    rows = results["rows"]
    assert "no fp8 matrix units on cpu" in rows["fp8"]["profile"]["skipped"]  # and no torchao here
    memory = rows["memory low"]
    assert memory["build"]["build_s"] > 0 and "card" not in memory  # no cap on a CPU
    assert [memory[f"{n} image(s)"]["adapter"] for n in (0, 2)] == ["base", "edit"]
    assert json.loads((tmp_path / "suite-memory-low.json").read_text())["rows"][1]["images"] == 2
    assert "memory low" in stdout[stdout.index("== summary") :]


def test_gpu_suite_kills_a_section_that_overruns_and_keeps_its_rows(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_suite import run_child
    from suite_rows import RowLog

    out = tmp_path / "suite.json"
    code = (
        "import subprocess, sys, time; sys.path.insert(0, 'bench'); from suite_rows import RowLog; "
        "RowLog(__import__('pathlib').Path(sys.argv[1])).append('slow', 'first', {'x': 1}); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    started = time.monotonic()
    status, seconds = run_child([sys.executable, "-c", code, str(out)], 5, tmp_path / "slow.log")
    assert status == "timed out after 5s" and seconds < 15 and time.monotonic() - started < 15
    with (tmp_path / "suite.rows.jsonl").open("a") as rows:
        rows.write('{"kind": "row", "section": "slow", "na')  # a write the kill tore
    assert RowLog(out).render()["rows"] == {"slow": {"first": {"x": 1}}}
    assert json.loads(out.read_text())["rows"] == {"slow": {"first": {"x": 1}}}


def fake_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{dist}.dist-info/METADATA", metadata)
        wheel.writestr(
            f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{dist}.dist-info/RECORD", "")


def test_gpu_wheels_pins_pydantic_core_from_the_pydantic_wheel(tmp_path):
    """Offline: pip reads fake wheels from a folder. The pydantic wheel pins a core that no Python here
    has; the script must carry that one, not the local install's (offered too)."""
    index = tmp_path / "index"
    index.mkdir()
    pinned = {"diffusers": "0.42.1", "transformers": "5.24.0", "peft": "0.21.2",
              "pydantic-settings": "2.16.3", "torchao": "0.18.0", "typing-extensions": "4.16.0"}  # fmt: skip
    others = ["annotated-types", "typing-inspection", "python-dotenv", "importlib-metadata", "zipp", "tqdm",
              "requests", "urllib3", "idna", "charset-normalizer", "certifi"]  # fmt: skip
    for name, version in [*pinned.items(), *((name, "1.0") for name in others)]:
        fake_wheel(index, name, version)
    fake_wheel(index, "pydantic", "2.14.4", ("annotated-types>=0.6.0", "pydantic-core==2.0.77"))
    fake_wheel(index, "pydantic-core", "2.0.77")
    fake_wheel(index, "pydantic-core", importlib.metadata.version("pydantic-core"))  # the local one
    wheels = tmp_path / "whl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index), GPU_WHEELS_DIR=str(wheels)
    )
    result = subprocess.run(
        ["bash", "bench/gpu_wheels.sh", "3.12"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pydantic 2.14.4 pins pydantic-core==2.0.77" in result.stdout
    main = sorted(path.name for path in wheels.glob("*.whl"))
    assert [name for name in main if name.startswith("pydantic_core")] == [
        "pydantic_core-2.0.77-py3-none-any.whl"
    ]
    assert not [name for name in main if name.startswith("torchao")]  # only the fp8 step sees it
    assert [path.name for path in (wheels / "fp8").glob("*.whl")] == ["torchao-0.18.0-py3-none-any.whl"]
    assert "total" in result.stdout.splitlines()[-1]


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


def test_preview_bench_prints_the_cost_against_the_step(tiny_cache):
    stdout = run_script(
        "bench/preview_bench.py", "--repeats", "1", "--steps", "2", "--cache-dir", str(tiny_cache)
    )
    assert "a preview costs" in stdout and "of a step" in stdout
    assert "bit-identical with and without previews: True" in stdout
    assert "picture 128x128, data URI" in stdout


def test_precision_bench_prints_fp8_and_lora_folding_against_their_baselines(tmp_path):
    out = tmp_path / "precision.json"
    stdout = run_script("bench/precision_bench.py", "--shapes", "small", "--repeats", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert "(a) fp8 storage" in stdout and "(b) LoRA folded" in stdout
    for row in report["fp8"]:
        # Per-row scales: e4m3's own rounding (about 2.7 %) and nothing flushed; a plain cast is no better.
        assert row["scaled_error"] < 0.03 and row["scaled_flushed"] < 1e-4
        assert row["plain_error"] >= row["scaled_error"] and row["plain_over_scaled"] >= 1
    small = [row for row in report["fp8"] if row["std"] == 0.01]  # where a plain cast hurts most
    assert small and all(row["plain_flushed"] > 0.03 and row["plain_over_scaled"] > 1.8 for row in small)
    for row in report["lora"]:
        # Folding in bf16 is as far from fp64 as the unfused path, but not the same numbers.
        assert 0.5 < row["fused_error"] / row["unfused_error"] < 2 and row["fused_vs_unfused"] > 0
        assert 0 < row["rounded_away"] < 1 and row["fused_error"] < 0.01


def test_batch_bench_prints_the_batch_against_one_after_another(tiny_cache):
    stdout = run_script(
        "bench/batch_bench.py",
        "--repeats",
        "1",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--cache-dir",
        str(tiny_cache),
    )
    assert "batch / sequential = " in stdout and "most 8-bit levels apart: [" in stdout
    assert "batch 2: " in stdout and "x batch 1" in stdout


def test_structured_bench_measures_the_constraint_per_token(tiny_cache):
    stdout = run_script("bench/structured_bench.py", "--repeats", "1", "--cache", str(tiny_cache))
    assert "constrained" in stdout and "ratio" in stdout
    assert "masking 152064 logits on" in stdout and "ms per step" in stdout

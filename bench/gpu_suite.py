"""The GPU suite: every GPU figure in one JSON file, in two calls that each fit one 600 s command.

    python bench/gpu_suite.py --call 1 --out $OUT/suite.json                           # ~8 min, H100/H200
    python bench/gpu_suite.py --call 2 --out $OUT/suite.json --fp8-site /tmp/site-fp8  # another ~8 min
    python bench/gpu_suite.py --shapes tiny --call 1 --out /tmp/suite.json             # tiny, on a CPU

On the lent GPU machine (torch but none of our other dependencies, no network), carry the wheels of
`bench/gpu_wheels.sh` and install them as README "Benchmarks" says.

This process only orchestrates: it never imports torch (so it never holds GPU memory, and each child
sees a clean GPU). It runs the import smoke test first (`bench/suite_smoke.py`, a hard timeout of
`--smoke-timeout-s`, 10 s) and stops there if that fails; then each section in its own process
under a hard timeout, the section's share of the budget left (`--budget-s`); one that overruns is
killed with its process group and recorded as timed out, and the rest still run. Every row is
appended to the results file the moment it is measured (`bench/suite_rows.py`), so a killed section
loses only the row in progress. The summary is printed last, whatever failed. Exits non-zero when
any section failed, timed out or was skipped.

Call 1: `matmul` (bf16 and fp8 matrix-product ceilings), `reference` (the full-size random-weight
models built, then the eager reference as whole jobs through `Engine.run` with 1 and 2 input images,
`--steps` steps, the translator held to `--tokens` tokens; the step caches if time allows),
`compiled` (the transformer's per-step time, TFLOP/s and relative error against eager at the 1- and
2-image token counts, and the cold compile time). Call 2: `fp8` (the same for the fp8 profile; torchao
from `--fp8-site` only there) and one `memory <mode>` section per memory mode (`bench/gpu_baseline.py`,
capped at its card, the CUDA context counted).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

from suite_rows import RowLog  # noqa: E402 (the bench folder on the path first)

#: The card each memory mode is documented for, as sold (GB): `models.cards.card_class` gives the
#: smallest card of that class, whose total the mode's process is capped at.
MODE_CARDS_GB = {"resident": 80, "balanced": 48, "low": 24, "stream": 24}
#: Input image counts each memory mode runs (the first one also warms up).
MODE_IMAGES = {"full": [2, 5], "tiny": [0, 2]}


@dataclass(frozen=True)
class Section:
    """One child process: its name, its weight in the budget (about its seconds on an H100, full
    shapes), the least time worth starting it with, and its command line."""

    name: str
    weight_s: float
    min_s: float
    command: Command


#: A section's command line, from the suite's arguments and the Unix time it must be done by.
Command = Callable[[argparse.Namespace, float], list[str]]


def measuring(section: str) -> Command:
    def command(args: argparse.Namespace, deadline: float) -> list[str]:
        cmd = [sys.executable, str(BENCH / "suite_sections.py"), section, "--shapes", args.shapes,
               "--out", str(args.out), "--size", str(args.size), "--steps", str(args.steps),
               "--tokens", str(args.tokens), "--repeats", str(args.repeats),
               "--deadline", f"{deadline:.0f}"]  # fmt: skip
        return cmd + (["--fp8-site", str(args.fp8_site)] if args.fp8_site else [])

    return command


def memory_mode(mode: str) -> Command:
    def command(args: argparse.Namespace, deadline: float) -> list[str]:
        cmd = [sys.executable, str(BENCH / "gpu_baseline.py"), "--shapes", args.shapes, "--memory", mode,
               "--steps", "4", "--max-new-tokens", str(args.tokens), "--size", str(args.size),
               "--images", *map(str, MODE_IMAGES[args.shapes]), "--suite-out", str(args.out),
               "--out", str(args.out.with_name(f"{args.out.stem}-memory-{mode}.json"))]  # fmt: skip
        return cmd + (["--card-gb", str(MODE_CARDS_GB[mode])] if args.shapes == "full" else [])

    return command


CALLS: dict[int, list[Section]] = {
    1: [
        Section("matmul", 20, 10, measuring("matmul")),
        Section("reference", 170, 60, measuring("reference")),
        Section("compiled", 270, 90, measuring("compiled")),
    ],
    2: [
        Section("fp8", 200, 90, measuring("fp8")),
        *(Section(f"memory {mode}", 70, 40, memory_mode(mode)) for mode in MODE_CARDS_GB),
    ],
}


def run_child(cmd: list[str], timeout_s: float, log_path: Path) -> tuple[str, float]:
    """Run `cmd` in its own process group, its output shown and kept in `log_path`; kill the whole
    group (inductor's compile workers included) at `timeout_s`. Returns its status and seconds."""
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with log_path.open("w") as log:
        child = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True,
        )  # fmt: skip

        def pump() -> None:
            assert child.stdout is not None
            for line in child.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                tail.append(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = child.wait(timeout=timeout_s)
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s:.0f}s"
        with_stragglers_gone(child)
        reader.join(timeout=10)
    if status.startswith("exit"):
        last = next((line for line in reversed(tail) if line.strip()), "")
        status += f": {last[-300:]}"
    return status, time.monotonic() - started


def with_stragglers_gone(child: subprocess.Popen) -> None:
    """Kill what is left of the child's process group (the child itself on a timeout)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()


class Suite:
    """One call: its budget, its results file, and each section's outcome."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.started = args, time.monotonic()
        self.log = RowLog(args.out)
        self.logs = args.out.with_name(f"{args.out.stem}.logs")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ok = True

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def record(self, section: str, outcome: dict[str, Any]) -> None:
        outcome = {"call": self.args.call, **outcome}
        self.log.append(section, "outcome", outcome, kind="section")
        self.ok = self.ok and outcome["status"] == "ok"
        print(f"== {section}: {outcome['status']} ({outcome.get('seconds', 0):.0f}s)", flush=True)

    def run(self, section: str, cmd: list[str], timeout_s: float) -> str:
        print(f"\n== {section} (timeout {timeout_s:.0f}s, {self.left():.0f}s of the budget left)", flush=True)
        status, seconds = run_child(cmd, timeout_s, self.logs / f"{section.replace(' ', '-')}.log")
        self.record(section, {"status": status, "seconds": round(seconds, 1), "timeout_s": round(timeout_s)})
        return status

    def smoke(self) -> bool:
        cmd = [sys.executable, str(BENCH / "suite_smoke.py"), "--shapes", self.args.shapes,
               "--out", str(self.args.out)]  # fmt: skip
        cmd += ["--fp8-site", str(self.args.fp8_site)] if self.args.fp8_site else []
        status = self.run("smoke", cmd, self.args.smoke_timeout_s)
        if status != "ok":
            print(
                f"\nThe import smoke test failed ({status}): nothing else runs. Its output above says "
                "which import or version; carry the wheels of bench/gpu_wheels.sh and install them as "
                "README 'Benchmarks' says (`--smoke-timeout-s` if only slow).",
                file=sys.stderr,
            )
        return status == "ok"

    def sections(self, sections: list[Section]) -> None:
        full = self.args.shapes == "full"
        for index, section in enumerate(sections):
            rest = sum(s.weight_s for s in sections[index:])
            timeout_s = self.left() * section.weight_s / rest
            if timeout_s < (section.min_s if full else 1):
                why = f"its share of the {self.left():.0f}s left is {timeout_s:.0f}s < {section.min_s:.0f}s"
                self.record(section.name, {"status": f"skipped: {why}", "seconds": 0})
                continue
            self.run(section.name, section.command(self.args, time.time() + timeout_s), timeout_s)


def chosen_sections(args: argparse.Namespace) -> list[Section]:
    sections = [s for s in CALLS[args.call] if not s.name.startswith("memory ")]
    if args.call == 2:
        sections += [s for s in CALLS[2] if s.name.removeprefix("memory ") in args.memory_modes]
    if args.sections:
        unknown = set(args.sections) - {s.name for s in CALLS[args.call]}
        if unknown:
            known = ", ".join(repr(s.name) for s in CALLS[args.call])
            raise SystemExit(f"--sections: call {args.call} has no {sorted(unknown)}; it has {known}")
        sections = [s for s in sections if s.name in args.sections]
    return sections


def main() -> int:
    from suite_summary import print_summary

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--call", type=int, choices=sorted(CALLS), default=1)
    parser.add_argument("--shapes", choices=["full", "tiny"], default="full")
    parser.add_argument("--out", type=Path, required=True, help="the JSON results file")
    parser.add_argument("--budget-s", type=float, default=480, help="this call's budget, smoke test included")
    parser.add_argument("--smoke-timeout-s", type=float, default=10)
    parser.add_argument("--sections", nargs="+", help="run only these of the call's sections")
    parser.add_argument("--steps", type=int, default=8, help="steps of the reference jobs")
    parser.add_argument("--size", type=int, help="side of inputs and output (default 1024; tiny: 64)")
    parser.add_argument("--tokens", type=int, default=64, help="the translator's fixed answer length")
    parser.add_argument("--repeats", type=int, default=5, help="timed transformer calls per figure")
    parser.add_argument("--memory-modes", nargs="*", choices=list(MODE_CARDS_GB), default=list(MODE_CARDS_GB))
    parser.add_argument("--compile-cache", type=Path, help="torch's compile cache (default: a fresh one)")
    parser.add_argument("--fp8-site", type=Path, help="torchao's folder, seen by the fp8 section only")
    args = parser.parse_args()
    args.size = args.size or (1024 if args.shapes == "full" else 64)
    args.out = args.out.resolve()
    sections = chosen_sections(args)
    # A fresh compile cache by default (outside the results folder, which may be copied back): the
    # first compile is cold.
    compile_cache = args.compile_cache or Path(tempfile.mkdtemp(prefix="dreamomni2-torch-compile-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # The sections' output is the machine's only report: the libraries' warnings about optional
    # dependencies and their progress bars would push the figures out of it.
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):  # fmt: skip
        os.environ.setdefault(name, value)
    suite = Suite(args)
    suite.log.append("suite", f"call {args.call}", {
        "shapes": args.shapes, "budget_s": args.budget_s, "size": args.size, "steps": args.steps,
        "tokens": args.tokens, "repeats": args.repeats, "sections": [s.name for s in sections],
        "compile_cache": str(compile_cache), "fp8_site": str(args.fp8_site) if args.fp8_site else None,
    }, kind="suite")  # fmt: skip
    if suite.smoke():
        suite.sections(sections)
    print_summary(suite.log.render())
    print(f"\nresults: {args.out} (rows as measured: {suite.log.lines}; logs: {suite.logs})")
    return 0 if suite.ok else 1


if __name__ == "__main__":
    sys.exit(main())

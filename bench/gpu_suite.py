"""The GPU suite: every memory mode on the full-size random-weight models, one fresh process each.

    python bench/gpu_suite.py --out-dir $OUT                  # on a lent H100/H200, within --budget-s
    python bench/gpu_suite.py --shapes tiny --out-dir /tmp/s  # the same runs on the tiny shapes, CPU

On the lent machine (torch only): `bench/gpu_wheels.sh` here fetches the other wheels into `.whl/`;
carry `.whl` and start the command with the install line that script prints.

Each mode runs `bench/gpu_baseline.py` in its own process (peak memory is per process), capped with
`torch.cuda.set_per_process_memory_fraction` at the card size the mode claims (resident 80 GiB,
balanced 48, low and stream 24), and prints per image count: step and job seconds, the planner's
predicted peak, and the measured peaks (PyTorch allocated and reserved, device used as NVML sees it).
A mode that runs out of memory under its cap is reported as such: that is a finding, not a crash.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The card each mode is documented for, in GiB: the cap it runs under here.
CARDS_GIB = {"resident": 80, "balanced": 48, "low": 24, "stream": 24}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=["full", "tiny"], default="full")
    parser.add_argument("--modes", nargs="+", default=list(CARDS_GIB), choices=list(CARDS_GIB))
    parser.add_argument("--images", type=int, nargs="+", default=[0, 2, 5])
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per job (memory needs few)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--timeout-s", type=int, default=170, help="per mode, at most")
    parser.add_argument(
        "--budget-s", type=int, default=540, help="for the whole suite (a device call's 600 s)"
    )
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    summary = {}
    suite_started = time.perf_counter()
    for index, mode in enumerate(args.modes):
        # Share what is left of the budget among the modes still to run.
        left = args.budget_s - (time.perf_counter() - suite_started)
        timeout = max(1, min(args.timeout_s, int(left / (len(args.modes) - index))))
        out = args.out_dir / f"{mode}.json"
        cmd = [
            sys.executable, str(ROOT / "bench" / "gpu_baseline.py"), "--shapes", args.shapes,
            "--memory", mode, "--steps", str(args.steps), "--max-new-tokens", str(args.max_new_tokens),
            "--images", *map(str, args.images), "--out", str(out),
        ]  # fmt: skip
        if args.shapes == "full":
            cmd += ["--card-gib", str(CARDS_GIB[mode])]
        else:
            cmd += ["--size", "64"]
        print(f"== {mode} (cap {CARDS_GIB[mode]} GiB)" if args.shapes == "full" else f"== {mode}", flush=True)
        started = time.perf_counter()
        try:
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            status = "ok" if result.returncode == 0 else f"exit {result.returncode}"
            print(result.stdout, end="")
            if result.returncode:
                tail = result.stderr.strip().splitlines()[-3:]
                status += ": " + (" | ".join(tail) if tail else "no output")
                print(status, file=sys.stderr)
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout}s"
            print(status, file=sys.stderr)
        summary[mode] = {"status": status, "seconds": round(time.perf_counter() - started, 1),
                         "report": json.loads(out.read_text()) if out.is_file() else None}  # fmt: skip
    (args.out_dir / "suite.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(v["status"] == "ok" for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

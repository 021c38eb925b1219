"""Exit 0 when this machine's worker is alive and not hung, 1 otherwise (startup and liveness probes).

    python -m workers.health [--max-age SECONDS]

The worker's heartbeat touches `DREAMOMNI2_LIVENESS_FILE` once its models are loaded, and then only
while it is idle or its job keeps making progress (`DREAMOMNI2_STALL_TIMEOUT_S`). A file older than
`--max-age` (default: four heartbeats, at least 30 s) means the worker is loading, hung, or dead.
"""

from __future__ import annotations

import argparse
import sys
import time

from workers.config import WorkerSettings


def main(argv: list[str] | None = None) -> int:
    settings = WorkerSettings()
    parser = argparse.ArgumentParser(prog="python -m workers.health", description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-age", type=float, default=max(30.0, 4 * settings.heartbeat_s))
    args = parser.parse_args(argv)
    try:
        age = time.time() - settings.liveness_file.stat().st_mtime
    except FileNotFoundError:
        print(f"not ready: {settings.liveness_file} does not exist (models loading, or the worker is down)")
        return 1
    if age > args.max_age:
        print(f"unhealthy: {settings.liveness_file} is {age:.0f}s old (limit {args.max_age:.0f}s)")
        return 1
    print(f"alive: heartbeat {age:.1f}s ago")
    return 0


if __name__ == "__main__":
    sys.exit(main())

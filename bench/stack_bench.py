"""What the service adds around the model, and how many submissions one gateway takes.

    python bench/stack_bench.py [--jobs 30] [--seconds 10]

1. Added time per job: HTTP submit (multipart, two 64x64 images, `Prefer: wait`) to result
   downloaded, through the real gateway, Redis and a Celery worker, against a direct `Engine.run` of
   the same tiny job in this process. Medians over `--jobs` jobs; prints the ratio and the difference.
2. Gateway submissions per second (validation, image decoding, Redis writes, queue message) with two
   64x64 images, with one and with two uvicorn worker processes; no GPU worker runs, so jobs queue.
   The load generator shares this machine's cores with the gateway: read the figures as a floor.

The stack runs with the quotas (README "Quotas") raised far above what the bench sends
(`BENCH_LIMITS`): part 2 measures the gateway, not the 10-a-second token bucket, and its thousands of
queued jobs stay under the per-key and whole-queue caps. Any answer but 202 stops the bench, named.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import PIL.Image

from api_schemas.jobs import JobParameters
from app.stack import LocalStack, free_port


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


FIELDS = {"instruction": "make the bag in image 1 use the pattern of the dress in image 2", "task": "edit"}
#: The quotas this bench needs: none that it can reach (a bench sets every limit it depends on).
BENCH_LIMITS = {
    "DREAMOMNI2_RATE_LIMIT_PER_S": "1000000",
    "DREAMOMNI2_RATE_LIMIT_BURST": "1000000",
    "DREAMOMNI2_MAX_ACTIVE_JOBS_PER_KEY": "1000000",
    "DREAMOMNI2_MAX_QUEUE_DEPTH": "1000000",
}


def files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{n}.png", data, "image/png")) for n, data in enumerate(images, start=1)]


def added_time(stack: LocalStack, cache: Path, images: list[bytes], jobs: int, steps: int) -> None:
    from models.engine import Engine
    from models.settings import EngineSettings

    engine = Engine.from_settings(EngineSettings(preset="tiny", cache_dir=cache, translator=False))
    params = JobParameters(**FIELDS, steps=steps, seed=1, translate=False)
    engine.run(images, params)
    direct = []
    for _ in range(jobs):
        started = time.perf_counter()
        engine.run(images, params)
        direct.append(time.perf_counter() - started)

    data = {**FIELDS, "steps": str(steps), "seed": "1", "translate": "false"}
    through, overhead = [], []
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        for n in range(jobs + 1):
            started = time.perf_counter()
            job = client.post(
                "/v1/jobs", files=files(images), data=data, headers={"Prefer": "wait=60"}
            ).json()
            assert job["status"] == "succeeded", job
            client.get(job["result"]["url"]).raise_for_status()
            if n:  # the first job warms the worker up
                elapsed = time.perf_counter() - started
                through.append(elapsed)
                overhead.append(elapsed - job["timings"]["total"])
    d, t = statistics.median(direct), statistics.median(through)
    print(f"\n1. one tiny edit, 2 images, {steps} steps, translator off; medians over {jobs} jobs")
    print(f"   direct Engine.run           {d * 1000:8.1f} ms")
    print(f"   HTTP submit -> result bytes {t * 1000:8.1f} ms")
    print(f"   ratio HTTP / direct         {t / d:8.2f}")
    print(f"   added per job (HTTP time minus the worker's own engine time, median) "
          f"{statistics.median(overhead) * 1000:.1f} ms")  # fmt: skip


def submissions_per_second(url: str, images: list[bytes], seconds: float, clients: int) -> float:
    done = 0
    refused: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop() -> None:
        nonlocal done
        with httpx.Client(base_url=url, timeout=30) as client:
            while time.monotonic() < stop_at and not refused:
                response = client.post("/v1/jobs", files=files(images), data=FIELDS)
                with lock:
                    if response.status_code != 202:
                        refused.append(f"{response.status_code}: {response.text[:300]}")
                        return
                    done += 1

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if refused:
        raise SystemExit(f"the gateway refused a submission after {done}: {refused[0]}")
    return done / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    images = [png(64, 64, 1), png(64, 64, 2)]

    with tempfile.TemporaryDirectory(prefix="dreamomni2-bench-") as tmp:
        cache = Path(tmp) / "cache"
        env = {"DREAMOMNI2_CACHE_DIR": str(cache), "DREAMOMNI2_TRANSLATOR": "false", **BENCH_LIMITS}
        with LocalStack(Path(tmp) / "stack", workers=1, env=env) as stack:
            added_time(stack, cache, images, args.jobs, args.steps)
            for process in stack.processes:
                if process.name.startswith("worker"):
                    process.stop()
            print(
                f"\n2. submissions per second, two 64x64 images, {args.clients} clients, {args.seconds:.0f} s"
            )
            rates = {}
            for processes in (1, 2):
                port = free_port()
                stack.start_gateway(port=port, processes=processes)
                rates[processes] = submissions_per_second(
                    f"http://127.0.0.1:{port}", images, args.seconds, args.clients
                )
                print(f"   {processes} uvicorn worker(s): {rates[processes]:7.1f} /s")
            print(f"   ratio 2 vs 1: {rates[2] / rates[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

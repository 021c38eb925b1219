"""`make demo`: the whole service on the tiny CPU preset, one two-image edit through the HTTP API.

Starts Redis, one worker and the gateway, submits an edit with two images, waits for it, saves the
result under out/demo/ and prints where, then stops everything it started. The tiny models have
random weights: the picture is noise-like, every step on the way is the real one.

While it runs it prints the address of the web page; `--keep` (`make demo KEEP=1`, or
DREAMOMNI2_DEMO_KEEP=1) keeps the stack up after the edit, until Ctrl-C, to try the page.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

from app.stack import ROOT, LocalStack, temporary_stack

INSTRUCTION = "Make the bag in image 1 use the pattern of the dress in image 2."


def example_images() -> list[bytes]:
    """A bag on a table (image 1, to edit) and a polka-dot dress (image 2, the reference)."""
    bag = Image.new("RGB", (160, 128), (236, 228, 214))
    draw = ImageDraw.Draw(bag)
    draw.rectangle((0, 96, 160, 128), fill=(150, 110, 70))
    draw.rounded_rectangle((48, 44, 112, 100), radius=8, fill=(120, 40, 40))
    draw.arc((60, 24, 100, 64), 180, 360, fill=(80, 25, 25), width=5)
    dress = Image.new("RGB", (96, 128), (255, 255, 255))
    draw = ImageDraw.Draw(dress)
    draw.polygon([(36, 8), (60, 8), (84, 124), (12, 124)], fill=(30, 60, 160))
    for x in range(16, 84, 12):
        for y in range(20, 120, 12):
            draw.ellipse((x, y, x + 5, y + 5), fill=(250, 250, 250))
    encoded = []
    for image in (bag, dress):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def wait_for_ctrl_c(stack: LocalStack) -> None:
    """Keep the demo's stack up until Ctrl-C (or SIGTERM), or until one of its processes exits."""
    stop = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    print(f"the stack stays up: the web page is at {stack.url}/  Ctrl-C stops it.", flush=True)
    try:
        while not stop:
            dead = [p for p in stack.processes if not p.alive()]
            if dead:
                print(f"{dead[0].name} exited; last log lines:\n{dead[0].log_tail()}", file=sys.stderr)
                return
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when the edit succeeded (and, with `--keep`, after Ctrl-C)."""
    parser = argparse.ArgumentParser(prog="python -m app.demo", description="One two-image edit, end to end.")
    parser.add_argument(
        "--keep",
        action="store_true",
        default=os.environ.get("DREAMOMNI2_DEMO_KEEP", "") not in ("", "0", "false"),
        help="keep the stack up after the edit, until Ctrl-C, to try the web page",
    )
    keep = parser.parse_args(argv).keep
    out_dir = ROOT / "out" / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    images = example_images()
    for n, data in enumerate(images, start=1):
        (out_dir / f"input-{n}.png").write_bytes(data)

    print("DreamOmni2 Serve demo: tiny random-weight models on CPU, local Redis, workers and the gateway")
    print("starting the stack (the first run builds the tiny models, a few seconds) ...", flush=True)
    started = time.perf_counter()
    with temporary_stack(workers=1) as stack:
        print(
            f"  gateway {stack.url}  redis {stack.redis_url}  ready in {time.perf_counter() - started:.1f}s"
        )
        hint = "" if keep else "  (while the demo runs; `make demo KEEP=1` keeps it up)"
        print(f"  web page {stack.url}/{hint}", flush=True)
        files = [("images", (f"input-{n}.png", data, "image/png")) for n, data in enumerate(images, start=1)]
        with httpx.Client(base_url=stack.url, timeout=120) as client:
            print(f'POST /v1/jobs  images: input-1.png, input-2.png  instruction: "{INSTRUCTION}"')
            response = client.post(
                "/v1/jobs",
                files=files,
                data={"instruction": INSTRUCTION, "task": "edit", "seed": "7"},
                headers={"Prefer": "wait=60"},
            )
            job = response.json()
            if response.status_code >= 400:
                print(f"refused ({response.status_code}): {job['error']['message']}", file=sys.stderr)
                return 1
            while job["status"] in ("queued", "running"):
                time.sleep(0.2)
                job = client.get(job["links"]["self"]).json()
            if job["status"] != "succeeded":
                print(f"job {job['id']} {job['status']}: {job['error']}", file=sys.stderr)
                return 1
            result = client.get(job["result"]["url"])
            result.raise_for_status()
        report(job, result.content, out_dir)
        if keep:
            wait_for_ctrl_c(stack)
    print("stopped everything it started (Redis, the workers, the gateway)")
    return 0


def report(job: dict, image: bytes, out_dir: Path) -> None:
    """Save the result and print what the job did."""
    path = out_dir / "result.png"
    path.write_bytes(image)
    timings = ", ".join(f"{k} {v:.3f}s" for k, v in job["timings"].items())
    how = "translated" if job["translated"] else f"instruction as is: {job['fallback_reason']}"
    print(
        f"job {job['id']} {job['status']}: adapter {job['adapter']}, seed {job['seed']}, {job['steps']} steps"
    )
    print(f"  prompt: {job['prompt']}  ({how})")
    print(f"  timings: {timings}")
    size = f"{job['result']['width']}x{job['result']['height']} {job['result']['content_type']}"
    print(f"result saved: {path}  ({size})", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""The `dreamomni2` command end to end: the installed console script in subprocesses, against the real
stack. Images written, --json, --no-wait and the job commands, the exit code of each failure class,
and the progress display: a bar on a terminal (a pseudo-terminal here), plain lines in a pipe."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sysconfig
import termios
import time
from pathlib import Path

import pytest
from PIL import Image

from app.stack import free_port
from dreamomni2 import cli_common as cli

from .conftest import Service
from .support import LONG_STEPS, example_images, get_job, is_denoising, png_bytes, wait_for_job

SCRIPT = Path(sysconfig.get_path("scripts")) / "dreamomni2"
UNKNOWN_JOB = "j_" + "0" * 32
JOB_ID = re.compile(r"^j_[0-9a-f]{32}$")


@pytest.fixture
def env(service: Service) -> dict[str, str]:
    """The command's environment: the main stack and alice's key, as a user would export them."""
    return {**os.environ, "DREAMOMNI2_SERVER": service.stack.url, "DREAMOMNI2_API_KEY": service.keys["alice"]}


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Two PNG files: image 1 and a reference."""
    paths = []
    for n, data in enumerate(example_images(2), start=1):
        path = tmp_path / f"image-{n}.png"
        path.write_bytes(data)
        paths.append(path)
    return paths


def start(args: list[str | Path], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    assert SCRIPT.exists(), f"{SCRIPT} is not installed: `pip install -e .` installs the console script"
    return subprocess.Popen(
        [str(SCRIPT), *map(str, args)],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(args: list[str | Path], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `dreamomni2 ARGS` with stdout and stderr piped (not a terminal)."""
    [done] = run_all([args], env, cwd)
    return done


def run_all(
    commands: list[list[str | Path]], env: dict[str, str], cwd: Path
) -> list[subprocess.CompletedProcess[str]]:
    """Run several commands at once (each mostly waits on a process start and the service)."""
    processes = [start(args, env, cwd) for args in commands]
    done = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=90)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return done


def image_of(path: Path) -> Image.Image:
    image = Image.open(io.BytesIO(path.read_bytes()))
    image.load()
    return image


def test_help_documents_the_commands_options_and_exit_codes(tmp_path: Path) -> None:
    top = run(["--help"], dict(os.environ), tmp_path)
    assert top.returncode == 0, top.stderr
    for command in ("edit", "generate", "mix", "dataset", "status", "result", "cancel", "events"):
        assert re.search(rf"^\s+{command}\s", top.stdout, re.MULTILINE), command
    for code in (cli.EXIT_REFUSED, cli.EXIT_FAILED, cli.EXIT_CANCELED, cli.EXIT_UNAVAILABLE, cli.EXIT_AUTH):
        assert re.search(rf"^\s+{code}\s+\w", top.stdout, re.MULTILINE), f"exit code {code} undocumented"
    assert "DREAMOMNI2_SERVER" in top.stdout and "DREAMOMNI2_API_KEY" in top.stdout
    assert "http://127.0.0.1:8000" in top.stdout

    generate = run(["generate", "--help"], dict(os.environ), tmp_path)
    assert generate.returncode == 0 and "exit codes" in generate.stdout
    for option in ("-o", "--seed", "--steps", "--guidance", "--size", "--format", "--step-cache",
                   "--no-translate", "--no-wait", "--json", "--server", "--api-key"):  # fmt: skip
        assert option in generate.stdout, option


def test_edit_saves_the_image_and_reports_plain_lines_in_a_pipe(
    service: Service, env: dict[str, str], images: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out.png"
    instruction = "make the bag in image 1 use the pattern of image 2"
    done = run(["edit", *images, instruction, "-o", out, "--steps", "4", "--seed", "3", "--no-translate"],
               env, tmp_path)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out}\n"
    lines = done.stderr.splitlines()
    job_id = lines[0].split(":")[0]
    assert JOB_ID.match(job_id) and all(line.startswith(f"{job_id}: ") for line in lines), lines
    assert lines[0] == f"{job_id}: queued (position 1)" or lines[0] == f"{job_id}: queued"
    assert f"{job_id}: denoise 4/4" in lines
    assert "succeeded" in lines[-1] and str(out) in lines[-1]
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr  # no bar, no terminal codes
    job = get_job(service.client("alice"), job_id)
    assert (job["image_count"], job["steps"], job["seed"], job["instruction"]) == (2, 4, 3, instruction)
    assert job["translated"] is False and job["fallback_reason"] == "disabled_by_request"
    image = image_of(out)
    assert image.format == "PNG" and image.size == (job["result"]["width"], job["result"]["height"])


def test_generate_with_json_output(service: Service, env: dict[str, str], images: list[Path], tmp_path: Path):
    out = tmp_path / "portrait.jpg"
    done = run(["--json", "-q", "generate", images[1], "a portrait in the style of image 1", "-o", out,
                "--steps", "2", "--size", "128x64", "--format", "jpeg", "--step-cache", "none",
                "--guidance", "4"], env, tmp_path)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # -q: no progress, no summary
    job = json.loads(done.stdout)
    assert job == get_job(service.client("alice"), job["id"])
    assert (job["status"], job["task"], job["adapter"], job["image_count"]) == (
        "succeeded", "generate", "generation", 1
    )  # fmt: skip
    assert (job["output_format"], job["guidance"], job["step_cache"]) == ("jpeg", 4.0, "none")
    image = image_of(out)
    assert image.format == "JPEG" and image.size == (job["result"]["width"], job["result"]["height"])
    assert image.width > image.height  # the 2:1 aspect asked for


def test_mix_saves_the_source_and_the_target(service: Service, env: dict[str, str], tmp_path: Path) -> None:
    done = run(["mix", "a chunky knitted red wool scarf", "a sofa", "--attribute", "material",
                "-o", "pair.png", "--steps", "1", "--seed", "4", "--mix-blocks", "double"],
               env, tmp_path)  # fmt: skip

    assert done.returncode == 0, done.stderr
    source, target = tmp_path / "pair-source.png", tmp_path / "pair-target.png"
    assert done.stdout == "pair-source.png\npair-target.png\n"
    job_id = done.stderr.splitlines()[0].split(":")[0]
    job = get_job(service.client("alice"), job_id)
    assert (job["task"], job["attribute"], job["seed"], job["mixing"]["blocks"]) == (
        "feature_mixing", "material", 4, "double"
    )  # fmt: skip
    assert source.read_bytes() != target.read_bytes()
    for path, result in zip((source, target), job["results"], strict=True):
        image = image_of(path)
        assert image.format == "PNG" and image.size == (result["width"], result["height"])
    status = run(["status", job_id], env, tmp_path)
    assert re.search(r"^source:\s+a chunky knitted red wool scarf$", status.stdout, re.MULTILINE), (
        status.stdout
    )
    assert re.search(r"^result 1:\s+\d+x\d+ image/png", status.stdout, re.MULTILINE), status.stdout


def test_n_saves_each_image_with_its_seed(service: Service, env: dict[str, str], tmp_path: Path) -> None:
    done = run(["generate", "a kite over the sea", "-n", "2", "--seed", "9", "--steps", "1",
                "-o", "kite.png"], env, tmp_path)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert done.stdout == "kite-0.png\nkite-1.png\n"
    first, second = (tmp_path / "kite-0.png").read_bytes(), (tmp_path / "kite-1.png").read_bytes()
    assert first != second
    job_id = done.stderr.splitlines()[0].split(":")[0]
    job = get_job(service.client("alice"), job_id)
    assert (job["num_images"], [r["seed"] for r in job["results"]]) == (2, [9, 10])
    status = run(["status", job_id], env, tmp_path)
    assert re.search(r"^result 1:\s+\d+x\d+ image/png, \d+ bytes, seed 10$", status.stdout, re.MULTILINE), (
        status.stdout
    )
    refused = run(["generate", "a kite", "-n", "2", "-o", "-"], env, tmp_path)
    assert refused.returncode == 2 and "-o -" in refused.stderr


def test_no_wait_then_status_events_and_result(
    service: Service, env: dict[str, str], images: list[Path], tmp_path: Path
) -> None:
    submitted = run(["edit", images[0], "make it blue", "--steps", "3", "--no-wait"], env, tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert JOB_ID.match(job_id), submitted.stdout

    events = run(["events", job_id], env, tmp_path)  # follows the job to its end
    assert events.returncode == 0, events.stderr
    lines = events.stdout.splitlines()
    assert re.fullmatch(r"\d+-\d+ queued( position=\d+)?", lines[0]), lines[0]
    assert re.fullmatch(r"\d+-\d+ started attempt=1", lines[1]), lines[1]
    assert any(re.fullmatch(r"\d+-\d+ progress denoise 3/3", line) for line in lines), lines
    assert re.fullmatch(r"\d+-\d+ succeeded", lines[-1]), lines[-1]

    first = lines[0].split()[0]
    status, plain, resumed, result = run_all(
        [
            ["status", job_id, "--json"],
            ["status", job_id],
            ["events", job_id, "--json", "--last-event-id", first],
            ["result", job_id, "-o", "result.png", "-q"],
        ],
        env,
        tmp_path,
    )
    assert status.returncode == 0, status.stderr
    job = json.loads(status.stdout)
    assert job["id"] == job_id and job["status"] == "succeeded"
    assert plain.returncode == 0 and re.search(r"^status:\s+succeeded$", plain.stdout, re.MULTILINE)

    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in resumed.stdout.splitlines()]
    assert [r["id"] for r in records] == [line.split()[0] for line in lines[1:]]
    assert records[-1]["event"] == "succeeded" and records[-1]["data"] == job
    over = run(["events", job_id, "--last-event-id", records[-1]["id"]], env, tmp_path)
    assert (over.returncode, over.stdout) == (0, "")  # nothing after the final event

    assert result.returncode == 0, result.stderr
    assert result.stdout == "result.png\n"
    expected = service.client("alice").get(f"/v1/jobs/{job_id}/result").content
    assert (tmp_path / "result.png").read_bytes() == expected


def test_cancel_and_the_exit_codes_of_an_unfinished_and_a_canceled_job(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    submitted = run(
        ["generate", "keep the worker busy", "--steps", str(LONG_STEPS), "--no-wait"], env, tmp_path
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    alice = service.client("alice")
    try:
        wait_for_job(alice, job_id, lambda j: is_denoising(j, 5), what="the long job to denoise")

        unfinished, waited = run_all(
            [["result", job_id, "--no-wait"], ["result", job_id, "--timeout", "0.5", "-q"]], env, tmp_path
        )
        assert unfinished.returncode == cli.EXIT_REFUSED, unfinished.stderr
        assert "job_not_finished" in unfinished.stderr
        assert waited.returncode == cli.EXIT_TIMEOUT, waited.stderr
        assert "wait_timeout" in waited.stderr

        canceled = run(["cancel", job_id], env, tmp_path)
        assert canceled.returncode == 0, canceled.stderr
        assert canceled.stdout == f"{job_id}: cancel requested; it stops at its next denoising step\n"
    finally:
        alice.post(f"/v1/jobs/{job_id}/cancel")  # the test's own failure must not leave it running

    # Both follow the job to its end.
    result, events = run_all([["result", job_id, "-o", "never.png"], ["events", job_id]], env, tmp_path)
    assert result.returncode == cli.EXIT_CANCELED, result.stderr
    assert "canceled" in result.stderr and not (tmp_path / "never.png").exists()
    assert events.returncode == cli.EXIT_CANCELED, events.stderr
    assert re.fullmatch(r"\d+-\d+ canceled canceled: .+", events.stdout.splitlines()[-1]), events.stdout[
        -500:
    ]
    again = run(["cancel", job_id, "--json"], env, tmp_path)
    assert again.returncode == cli.EXIT_REFUSED
    assert json.loads(again.stdout)["error"]["code"] == "job_finished"


def test_each_failure_class_has_its_exit_code(
    service: Service, env: dict[str, str], lax_gateway: str, tmp_path: Path
) -> None:
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(png_bytes(8, 8))  # the lax gateway takes it; the worker refuses it
    cases = {
        "refused": (["generate", "a red bag", "--steps", "0"], cli.EXIT_REFUSED, "invalid_steps"),
        "no key": (["--api-key", "not-a-key", "status", UNKNOWN_JOB], cli.EXIT_AUTH, "invalid_api_key"),
        "not found": (["status", UNKNOWN_JOB], cli.EXIT_NOT_FOUND, "job_not_found"),
        "unreachable": (
            ["--server", f"http://127.0.0.1:{free_port()}", "status", UNKNOWN_JOB],
            cli.EXIT_UNAVAILABLE,
            "unreachable",
        ),
        "failed": (
            ["edit", tiny, "make it red", "--steps", "2", "--server", lax_gateway],
            cli.EXIT_FAILED,
            "image_too_small",
        ),
        "usage": (["edit", tmp_path / "missing.png", "make it red"], cli.EXIT_USAGE, "no such file"),
    }
    outcomes = run_all([args for args, _, _ in cases.values()], env, tmp_path)
    for (name, (_, code, message)), done in zip(cases.items(), outcomes, strict=True):
        assert done.returncode == code, f"{name}: exit {done.returncode}\n{done.stderr}"
        assert message in done.stderr, f"{name}: {done.stderr}"
        assert "Traceback" not in done.stderr, f"{name}: {done.stderr}"
    assert service.store.queue_depth() == 0


def test_a_terminal_gets_a_progress_bar(env: dict[str, str], images: list[Path], tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    # A terminal 100 columns wide (a new pseudo-terminal has no size, which tqdm would take as 0).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    out = tmp_path / "out.png"
    process = subprocess.Popen(
        [str(SCRIPT), "edit", str(images[0]), "make it teal", "-o", str(out), "--steps", "6"],
        env={**env, "TERM": "xterm"},
        cwd=tmp_path,
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError as exc:  # EIO: the command exited and closed its end
            assert exc.errno == errno.EIO
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(timeout=30) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")

    assert "\r" in text  # redrawn in place
    assert re.search(r"denoise: 100%\|[^|]*\| 6/6", text), text
    assert "queued" in text  # the queue phase, shown before the steps
    assert f"{out}" in text and "succeeded" in text
    assert image_of(out).format == "PNG"
    # Not the plain lines a pipe gets.
    assert not re.search(r"j_[0-9a-f]{32}: denoise \d+/6", text), text


def test_lora_options_reach_the_job_and_a_bad_one_is_a_usage_error(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    done, no_scale, no_name, not_finite = run_all(
        [["--json", "-q", "generate", "a kite", "--steps", "1", "-o", "kite.png",
          "--lora", "style:0.25", "--lora", "comfy"],
         ["generate", "a kite", "--lora", "style:"],
         ["generate", "a kite", "--lora", ":0.5"],
         ["generate", "a kite", "--lora", "style:nan"]],
        env, tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job = get_job(service.client("alice"), json.loads(done.stdout)["id"])
    assert job["loras"] == [{"name": "style", "scale": 0.25}, {"name": "comfy", "scale": 1.0}]
    for refused, problem in ((no_scale, "is not a finite number"), (no_name, "names no LoRA"),
                             (not_finite, "is not a finite number")):  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert "--lora" in refused.stderr and problem in refused.stderr and "NAME:SCALE" in refused.stderr

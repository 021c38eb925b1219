"""`dreamomni2 dataset` end to end: a JSONL file of prompt pairs through the installed console script
against the real stack. One folder per pair and the manifest; a rerun skips what is done and picks up
a job an interrupted run had submitted; bad lines are reported by number while the others are made."""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dreamomni2 import Client, JobStatus
from dreamomni2.cli_common import EXIT_FAILED
from dreamomni2.dataset import DatasetFolder, PairOptions, parse_line

from .conftest import Service
from .support import LONG_STEPS

SCRIPT = Path(sysconfig.get_path("scripts")) / "dreamomni2"
PAIRS = [
    {"attribute": "material", "source_prompt": "a woven straw hat on a table", "target_prompt": "a teapot"},
    {"attribute": "pose", "source_prompt": "a dancer leaping", "target_prompt": "an old man", "seed": 9},
    {"attribute": "hairstyle", "source_prompt": "a woman with a red afro", "target_prompt": "a bearded man"},
]


@pytest.fixture
def env(service: Service) -> dict[str, str]:
    return {**os.environ, "DREAMOMNI2_SERVER": service.stack.url, "DREAMOMNI2_API_KEY": service.keys["alice"]}


def dataset(args: list[str | Path], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `dreamomni2 dataset ARGS --steps 1` (stdout and stderr piped)."""
    command = [str(SCRIPT), "dataset", *map(str, args), "--steps", "1"]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_pairs_and_manifest_then_a_rerun_skips_them_and_an_earlier_job_is_picked_up(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "pairs"
    lines = ["# pairs for the test", *map(json.dumps, PAIRS[:2]), "", json.dumps(PAIRS[2])]  # lines 2, 3, 5
    prompts.write_text("\n".join(lines) + "\n")
    options = PairOptions(steps=1)
    pairs = [parse_line(number, lines[number - 1]) for number in (2, 3, 5)]
    ids = [pair.pair_id(options) for pair in pairs if pair is not None]
    # An interrupted run submitted the first pair and died: the next run must get that job back.
    with Client(service.stack.url, api_key=service.keys["alice"]) as client:
        request = pairs[0].request(options) if pairs[0] is not None else {}
        earlier = client.feature_mix(**request, idempotency_key=DatasetFolder(out).idempotency_key(ids[0]))

    done = dataset([prompts, out, "--concurrency", "2"], env, tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"done 3, skipped 0, failed 0; manifest {out / 'manifest.jsonl'}\n"
    records = sorted(manifest(out), key=lambda r: r["line"])
    assert [(r["line"], r["pair_id"]) for r in records] == list(zip((2, 3, 5), ids, strict=True))
    assert records[0]["job_id"] == earlier.id  # not submitted twice
    assert len({r["job_id"] for r in records}) == 3
    assert records[1]["seed"] == 9 and all(isinstance(r["seed"], int) for r in records)
    for record, pair in zip(records, PAIRS, strict=True):
        assert {k: record[k] for k in pair if k != "seed"} == {k: v for k, v in pair.items() if k != "seed"}
        assert (record["steps"], record["mixing"]["blocks"], record["output_format"]) == (1, "all", "png")
        assert (record["source"], record["target"]) == (
            f"{record['pair_id']}/source.png",
            f"{record['pair_id']}/target.png",
        )
        source, target = (out / record["source"]).read_bytes(), (out / record["target"]).read_bytes()
        assert source != target
        assert list(Image.open(out / record["target"]).size) == record["size"]
    with Client(service.stack.url, api_key=service.keys["alice"]) as client:
        assert client.get(earlier).status is JobStatus.SUCCEEDED

    before = (out / "manifest.jsonl").read_bytes()
    again = dataset([prompts, out, "--json", "-q"], env, tmp_path)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["done"], summary["skipped"], summary["failed"], summary["failures"]) == (0, 3, 0, [])
    assert (out / "manifest.jsonl").read_bytes() == before  # nothing new was made


def test_bad_lines_are_reported_by_number_and_a_failed_job_is_retried_by_the_next_run(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "pairs"
    lines = [
        json.dumps(PAIRS[0]),
        '{"source_prompt": "a cat", "target_prompt": "a dog"',
        json.dumps({"source_prompt": "a cat"}),
        json.dumps({"source_prompt": "a cat " * 400, "target_prompt": "a dog"}),  # the service refuses it
        json.dumps(
            {"attribute": "style", "source_prompt": "a fox, ukiyo-e", "target_prompt": "a lighthouse"}
        ),
    ]
    prompts.write_text("\n".join(lines) + "\n")
    # Line 5's job was submitted before and canceled: this run gets it back, failed; the next retries.
    last = parse_line(5, lines[4])
    assert last is not None
    key = DatasetFolder(out).idempotency_key(last.pair_id(PairOptions(steps=1)))
    with Client(service.stack.url, api_key=service.keys["alice"]) as client:
        busy = client.submit("keep the worker busy", task="generate", steps=LONG_STEPS)
        try:  # queued behind the busy job, so canceled at once
            pair_job = client.feature_mix(**last.request(PairOptions(steps=1)), idempotency_key=key)
            canceled = client.cancel(pair_job)
        finally:
            client.cancel(busy)
    assert canceled.status is JobStatus.CANCELED

    done = dataset([prompts, out], env, tmp_path)

    assert done.returncode == EXIT_FAILED, done.stderr
    summary, *failures = done.stdout.splitlines()
    assert summary.startswith("done 1, skipped 0, failed 4;"), done.stdout
    assert failures[0].startswith("line 2: not JSON"), failures
    assert failures[1] == "line 3: target_prompt is missing or empty"
    assert failures[2].startswith("line 4: prompt_too_long: source_prompt has"), failures
    assert failures[3].startswith("line 5: canceled:"), failures
    assert [r["line"] for r in manifest(out)] == [1]
    assert "Traceback" not in done.stderr

    again = dataset([prompts, out], env, tmp_path)
    assert again.returncode == EXIT_FAILED, again.stderr
    assert again.stdout.startswith("done 1, skipped 1, failed 3;"), again.stdout
    retried = manifest(out)[-1]
    assert retried["line"] == 5 and retried["job_id"] != canceled.id

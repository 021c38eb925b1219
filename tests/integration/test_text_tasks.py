"""The text tasks through the real stack (gateway, Redis, a Celery worker with the tiny models): a judge
job scores an edit's output, and `dreamomni2 prompts` writes pairs from keywords that `dreamomni2
dataset` then makes into image pairs, both through the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
from pathlib import Path

from dreamomni2 import Client, JudgeVerdict, parse_judge_answer
from dreamomni2.cli import main
from dreamomni2.dataset import read_prompts

from .conftest import Service
from .support import example_images

SCRIPT = Path(sysconfig.get_path("scripts")) / "dreamomni2"


def test_a_judge_job_scores_an_edits_output_and_returns_json(service: Service, alice, capsys):
    inputs = example_images(2)
    with Client(service.stack.url, api_key=service.keys["alice"]) as client:
        edit = client.wait(client.submit("make the bag in image 1 red", inputs, steps=1, seed=3))
        output = client.result_bytes(edit)

        judged = client.wait(client.judge("make the bag in image 1 red", inputs, output))

    assert (judged.task.value, judged.image_count, judged.steps, judged.results) == ("judge", 3, 0, None)
    verdict = judged.output
    # Decoded under the verdict's schema, even the random VLM's answer is a verdict.
    assert isinstance(verdict, JudgeVerdict) and not verdict.unscored
    assert verdict == parse_judge_answer(judged.output_raw)
    scores = [verdict.instruction_following, verdict.consistency, verdict.absence_of_distortion]
    assert all(1 <= score <= 5 for score in scores) and verdict.success == all(score > 3 for score in scores)
    assert set(judged.timings) == {"generate", "total"} and judged.progress.stage == "generate"
    # The result is the JSON in the job object, as every client sees it; there is no image.
    assert alice.get(f"/v1/jobs/{judged.id}").json()["output"] == verdict.model_dump(mode="json")
    no_image = alice.get(f"/v1/jobs/{judged.id}/result")
    assert no_image.status_code == 404 and no_image.json()["error"]["code"] == "result_index"
    assert "`output`" in no_image.json()["error"]["message"]
    assert main(["--server", service.stack.url, "--api-key", service.keys["alice"], "status", judged.id]) == 0
    assert f"output:      {verdict.model_dump_json(exclude={'task'})}" in capsys.readouterr().out


def test_prompts_from_keywords_feed_a_dataset_end_to_end(service: Service, tmp_path: Path):
    env = {**os.environ, "DREAMOMNI2_SERVER": service.stack.url, "DREAMOMNI2_API_KEY": service.keys["alice"]}
    attributes, prompts, pairs = tmp_path / "attributes.txt", tmp_path / "prompts.jsonl", tmp_path / "pairs"
    too_long = "a" * 201  # the service refuses it: reported by its line, the others written
    attributes.write_text(f"# keywords\nrattan weave\n\n{too_long}\ncrossed  arms\nrattan weave\n")

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        command = [str(SCRIPT), *map(str, args)]
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    written = run("prompts", attributes, "-o", prompts, "--per-attribute", "2")

    assert written.returncode == 6, written.stderr  # EXIT_FAILED: one keyword failed
    assert f"4 pair(s) for 2 of 3 keyword(s) written to {prompts}; failed 1" in written.stderr
    assert "line 4 (" in written.stderr and "prompt_too_long" in written.stderr
    lines = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert [line["attribute"] for line in lines] == ["rattan weave"] * 2 + ["crossed arms"] * 2
    assert all(set(line) == {"attribute", "source_prompt", "target_prompt"} for line in lines)
    parsed, bad = read_prompts(prompts)
    assert len(parsed) == 4 and bad == []

    made = run("dataset", prompts, pairs, "--steps", "1", "--concurrency", "2")

    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("done 4, skipped 0, failed 0;"), made.stdout
    manifest = [json.loads(line) for line in (pairs / "manifest.jsonl").read_text().splitlines()]
    assert sorted((r["attribute"], r["source_prompt"]) for r in manifest) == sorted(
        (line["attribute"], line["source_prompt"]) for line in lines
    )
    assert all((pairs / r["source"]).is_file() and (pairs / r["target"]).is_file() for r in manifest)

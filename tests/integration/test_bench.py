"""`dreamomni2 bench` end to end: a small benchmark in the published layout (edits and generations,
1 to 5 images, several categories) through the installed console script against the real stack;
results.jsonl, the saved outputs, the summary table, the report opened in headless Chromium, and a
rerun that resumes without a new job (a job an interrupted run had submitted is picked up)."""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, sync_playwright

from dreamomni2 import Client
from dreamomni2.bench.discovery import discover
from dreamomni2.bench.results import BenchFolder, SamplingOptions, case_key

from .conftest import Service
from .support import LoopbackServer, noise_png
from .test_web_page import CHROMIUM

SCRIPT = Path(sysconfig.get_path("scripts")) / "dreamomni2"
#: case folder -> (instruction, image files): 2, 5, 1 and 3 images.
CASES = {
    "editing_benchmark/concrete_object/1": ("put the cat of image 2 on the sofa", ["src.png", "ref.png"]),
    "editing_benchmark/abstract_local/1": (
        "give the bag image 2's pattern, image 3's colour, image 4's strap and image 5's clasp",
        ["ref_3.png", "src.png", "ref_1.png", "ref_0.png", "ref_2.png", "res.png"],  # res.png: a result
    ),
    "generation_benchmark/abstract_global/1": ("a lighthouse in the style of image 1", ["img1.png"]),
    "generation_benchmark/concrete_object/7": (
        "these three on a beach",
        ["img2.png", "img1.png", "img3.png"],
    ),
}


def build_bench(root: Path) -> Path:
    for number, (folder, (instruction, images)) in enumerate(CASES.items()):
        case_dir = root / folder
        case_dir.mkdir(parents=True)
        (case_dir / "instruction.txt").write_text(instruction + "\n")
        for index, name in enumerate(images):
            (case_dir / name).write_bytes(noise_png(64, 48, seed=number * 10 + index))
    return root


@pytest.fixture
def env(service: Service) -> dict[str, str]:
    return {**os.environ, "DREAMOMNI2_SERVER": service.stack.url, "DREAMOMNI2_API_KEY": service.keys["alice"]}


def bench(args: list[str | Path], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `dreamomni2 bench ARGS --steps 1` (stdout and stderr piped)."""
    command = [str(SCRIPT), "bench", *map(str, args), "--steps", "1"]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def job_count(service: Service) -> int:
    """Jobs stored in the stack's Redis (their hashes, not their images, results or events)."""
    return sum(1 for key in service.redis.scan_iter(match="do2:job:j_*") if key.count(b":") == 2)


def open_report(report: Path) -> dict[str, Any]:
    """Open report.html in headless Chromium with every request but the page's own refused; what it shows."""
    with sync_playwright() as playwright:
        browser: Browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                      args=["--disable-dev-shm-usage"])  # fmt: skip
        try:
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.route("**/*", lambda route: route.continue_() if route.request.url == report.as_uri()
                       else route.abort())  # fmt: skip
            page.goto(report.as_uri())
            page.wait_for_load_state("load")
            shown = page.evaluate(
                """() => ({
                    images: [...document.images].map(i => ({alt: i.alt, complete: i.complete,
                        width: i.naturalWidth, data: i.src.startsWith('data:image/jpeg;base64,')})),
                    summary: [...document.querySelectorAll('table.summary tr')].map(
                        r => [...r.children].map(c => c.textContent)),
                    headings: [...document.querySelectorAll('h2, h3')].map(h => h.textContent),
                    cases: [...document.querySelectorAll('section.case h4')].map(h => h.textContent),
                    first: document.body.firstElementChild.nextElementSibling.tagName,
                })"""
            )
        finally:
            browser.close()
    return {**shown, "requests": requests}


def test_a_benchmark_runs_end_to_end_reports_and_a_rerun_makes_no_new_job(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    bench_dir, out = build_bench(tmp_path / "DreamOmni2Bench"), tmp_path / "out"
    cases, _ = discover(bench_dir)
    # An interrupted run submitted the second edit and died: this run must get that job back.
    interrupted = next(case for case in cases if case.case_id == "edit/abstract_local/1")
    key = BenchFolder(out).idempotency_key(case_key(interrupted, SamplingOptions(steps=1)))
    with Client(service.stack.url, api_key=service.keys["alice"]) as client:
        earlier = client.submit(interrupted.instruction, list(interrupted.images), task="edit", steps=1,
                                idempotency_key=key)  # fmt: skip
    before = job_count(service)

    done = bench([bench_dir, out, "--concurrency", "2"], env, tmp_path)

    assert done.returncode == 0, done.stderr
    assert job_count(service) == before + 3  # the earlier job was picked up, not submitted again
    records = results(out)
    assert [r["case_id"] for r in records] == [
        "edit/abstract_local/1", "edit/concrete_object/1", "generate/abstract_global/1",
        "generate/concrete_object/7",
    ]  # fmt: skip
    by_id = {r["case_id"]: r for r in records}
    assert by_id["edit/abstract_local/1"]["job_id"] == earlier.id
    assert [by_id[i]["image_count"] for i in by_id] == [5, 2, 1, 3]
    assert [Path(p).name for p in by_id["edit/abstract_local/1"]["images"]] == [
        "src.png", "ref_0.png", "ref_1.png", "ref_2.png", "ref_3.png"]  # fmt: skip
    assert [by_id[i]["scope"] for i in by_id] == ["local_attribute", "object", "global_attribute", "object"]
    assert len({r["job_id"] for r in records}) == 4
    for record in records:
        assert record["status"] == "succeeded" and record["error"] is None
        assert record["output"] == f"outputs/{record['case_id']}.png"
        assert Image.open(out / record["output"]).size[0] > 0
        assert {"translate", "encode", "denoise", "decode", "total"} <= set(record["timings"])
        assert record["latency_s"] >= record["timings"]["total"] > 0
        assert record["steps"] == 1 and isinstance(record["seed"], int) and record["prompt"]
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["task", "category", "cases", "succeeded"]
    table = {tuple(line.split()[:2]): line.split()[2:4] for line in lines[2:7]}
    assert table == {("edit", "abstract_local"): ["1", "1"], ("edit", "concrete_object"): ["1", "1"],
                     ("generate", "abstract_global"): ["1", "1"], ("generate", "concrete_object"): ["1", "1"],
                     ("all", "all"): ["4", "4"]}  # fmt: skip
    assert lines[7].startswith("jobs per minute: ") and "(4 job(s) this run)" in lines[7]
    assert lines[8].startswith("ran 4, skipped 0, failed 0;")

    shown = open_report(out / "report.html")
    assert shown["requests"] == [(out / "report.html").as_uri()]  # self-contained: nothing else fetched
    assert shown["first"] == "TABLE"  # the summary on top
    assert [row[:4] for row in shown["summary"][1:]] == [
        ["edit", "abstract_local", "1", "1"], ["edit", "concrete_object", "1", "1"],
        ["generate", "abstract_global", "1", "1"], ["generate", "concrete_object", "1", "1"],
        ["all", "all", "4", "4"],
    ]  # fmt: skip
    assert shown["headings"][:2] == ["edit", "edit / abstract_local (1 case(s))"]
    assert shown["cases"] == [r["case_id"] for r in records]
    assert len(shown["images"]) == 11 + 4  # every input and every output
    assert all(i["complete"] and i["width"] > 0 and i["data"] for i in shown["images"])
    assert [i["alt"] for i in shown["images"][:6]] == [*(f"image {n}" for n in range(1, 6)), "output"]

    before, saved = job_count(service), (out / "results.jsonl").read_bytes()
    again = bench([bench_dir, out, "--json", "-q"], env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert job_count(service) == before  # nothing submitted
    assert (out / "results.jsonl").read_bytes() == saved
    summary = json.loads(again.stdout)
    assert (summary["rows"][-1]["cases"], summary["rows"][-1]["succeeded"]) == (4, 4)
    assert summary["jobs_this_run"] == 0 and summary["jobs_per_minute"] is None
    assert summary["failures"] == []


class ChatEndpoint(LoopbackServer):
    """An external OpenAI-compatible judge (a test double of an outside service): answers each chat
    completion from `answers` by the case's instruction, a status or the assistant's text."""

    def __init__(self, answers: dict[str, int | str]) -> None:
        super().__init__("chat-endpoint")
        self.answers = answers
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> int | tuple[int, bytes]:
        request = json.loads(body)
        self.requests.append((path, headers, request))
        prompt = request["messages"][0]["content"][-1]["text"]
        answer = next(a for instruction, a in self.answers.items() if f'"{instruction}"' in prompt)
        if isinstance(answer, int):
            return answer
        return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()

    def asked(self) -> list[str]:
        """The instruction of each request so far, in order."""
        prompts = [request["messages"][0]["content"][-1]["text"] for _, _, request in self.requests]
        return [next(i for i in self.answers if f'"{i}"' in prompt) for prompt in prompts]


def test_judged_by_an_external_endpoint_then_by_the_service_with_no_new_image_job(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    bench_dir, out = build_bench(tmp_path / "bench"), tmp_path / "out"
    # The first three cases in the benchmark's order; the endpoint fails one, scores one, rambles on one.
    folders = ("editing_benchmark/concrete_object", "editing_benchmark/abstract_local",
               "generation_benchmark/abstract_global")  # fmt: skip
    first, second, third = (CASES[f"{folder}/1"][0] for folder in folders)
    scores = '{"instruction_following": 4, "consistency": 5, "absence_of_distortion": 4, "reason": "fine"}'
    answers: dict[str, int | str] = {first: 503, second: scores, third: "I cannot judge this."}
    with ChatEndpoint(answers) as endpoint:
        url = f"http://127.0.0.1:{endpoint.port}/v1"
        judged = bench([bench_dir, out, "--limit", "3", "--judge-url", url, "--judge-model", "big-vlm",
                        "--judge-api-key", "sk-test"], env, tmp_path)  # fmt: skip

        assert judged.returncode == 0, judged.stderr
        by_id = {r["case_id"]: r for r in results(out)}
        unanswered, scored, unscored = (by_id[i]["judge"] for i in ("edit/concrete_object/1",
                                        "edit/abstract_local/1", "generate/abstract_global/1"))  # fmt: skip
        assert unanswered["error"].startswith("judge_unavailable:") and unanswered["scores"] is None
        assert scored == {
            "by": "url", "model": "big-vlm", "reason": "fine", "success": True, "unscored": False,
            "scores": {"instruction_following": 4, "consistency": 5, "absence_of_distortion": 4},
            "raw": scores, "error": None,
        }  # fmt: skip
        assert (unscored["unscored"], unscored["scores"], unscored["success"]) == (True, None, None)
        assert unscored["raw"] == "I cannot judge this."
        assert endpoint.asked().count(first) == 3  # a 503 is asked again twice, then left for the next run
        path, headers, request = endpoint.requests[-1]
        assert (path, headers["authorization"]) == ("/v1/chat/completions", "Bearer sk-test")
        assert request["model"] == "big-vlm"
        assert request["response_format"]["json_schema"]["schema"]["required"] == [
            "instruction_following", "consistency", "absence_of_distortion", "reason"]  # fmt: skip
        parts = request["messages"][0]["content"]
        case = by_id[next(i for i in by_id if by_id[i]["instruction"] == endpoint.asked()[-1])]
        assert [p["type"] for p in parts] == ["image_url"] * (case["image_count"] + 1) + ["text"]
        assert all(p["image_url"]["url"].startswith("data:image/jpeg;base64,") for p in parts[:-1])
        row = next(line for line in judged.stdout.splitlines() if line.startswith("all"))
        assert row.split()[2:] == ["3", "3", *row.split()[4:6], "1/1", "(100%)", "+1", "unscored"]
        assert "the judge gave no answer for 1 case(s) (edit/concrete_object/1)" in judged.stdout
        report = (out / "report.html").read_text()
        assert "unscored; its answer: <q>I cannot judge this.</q>" in report and "success (" in report

        # The endpoint answers now: only the unanswered case is asked again; no image job is made.
        answers[first] = scores
        jobs, asked = job_count(service), len(endpoint.requests)
        again = bench([bench_dir, out, "--limit", "3", "--judge-url", url, "--judge-model", "big-vlm"], env,
                      tmp_path)  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert endpoint.asked()[asked:] == [first] and job_count(service) == jobs
        assert {r["case_id"]: r for r in results(out)}["edit/concrete_object/1"]["judge"]["success"] is True

    # The service's own judge (one case: a judge job of the tiny VLM takes seconds), then no job on a rerun.
    by_service = bench([bench_dir, out, "--limit", "1", "--judge"], env, tmp_path)
    assert by_service.returncode == 0, by_service.stderr
    assert job_count(service) == jobs + 1
    verdict = results(out)[0]["judge"]
    assert verdict["by"] == "service" and verdict["job_id"].startswith("j_") and verdict["error"] is None
    assert isinstance(verdict["raw"], str) and isinstance(verdict["unscored"], bool)
    if not verdict["unscored"]:  # random weights: scored or unscored, but never a made-up score
        assert all(1 <= score <= 5 for score in verdict["scores"].values())
        assert verdict["success"] is all(score > 3 for score in verdict["scores"].values())
    rerun = bench([bench_dir, out, "--limit", "1", "--judge"], env, tmp_path)
    assert rerun.returncode == 0 and job_count(service) == jobs + 1


def test_refusals_every_case_would_meet_stop_the_run_and_bad_folders_are_usage_errors(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    bench_dir, out = build_bench(tmp_path / "bench"), tmp_path / "out"
    before = job_count(service)
    for options, code in (
        (["--guidance", "nan"], "invalid_request"),
        (["--steps", "100000"], "invalid_steps"),
    ):
        refused = subprocess.run([str(SCRIPT), "bench", str(bench_dir), str(out), *options], env=env,
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert refused.returncode == 3, refused.stderr
        assert refused.stderr.startswith(f"dreamomni2: {code}: "), refused.stderr
        assert "Traceback" not in refused.stderr
    assert job_count(service) == before
    (tmp_path / "empty").mkdir()
    for args, message in (
        ([tmp_path / "empty", out], "has neither cases.jsonl nor the published folders"),
        ([bench_dir, out, "--only", "hats"], "no category hats in the benchmark; it has abstract_global"),
    ):
        usage = bench(args, env, tmp_path)
        assert usage.returncode == 2 and message in usage.stderr, usage.stderr

"""The benchmark's summary (per task x category, the service figures) and the external judge's answers:
scored when they hold the three scores, unscored with their raw text when they do not."""

from __future__ import annotations

import pytest

from api_schemas.text_tasks import parse_judge_answer
from dreamomni2.bench.judge_client import answer_text, chat_completions_url
from dreamomni2.bench.judging import verdict_record
from dreamomni2.bench.summary import format_table, percentile, summarize


def record(task: str, category: str, status: str = "succeeded", **fields: object) -> dict[str, object]:
    case_id = f"{task}/{category}/{len(fields)}"
    return {
        "case_id": case_id,
        "task": task,
        "category": category,
        "status": status,
        "job_id": "j_1",
        **fields,
    }


def verdict(success: bool | None) -> dict[str, object]:
    scores = None if success is None else {"instruction_following": 5 if success else 2}
    return {"scores": scores, "success": success, "raw": "...", "error": None}


def test_percentiles_interpolate_between_ranks():
    assert percentile([], 50) is None
    assert percentile([4.0], 95) == 4.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(n) for n in range(1, 101)], 95) == pytest.approx(95.05)


def test_rows_per_task_and_category_with_the_judged_success_rate():
    records = [
        record("generate", "style", latency_s=3.0, timings={"total": 2.0}, judge=verdict(True)),
        record("edit", "object", latency_s=1.0, timings={"total": 1.0}, judge=verdict(True)),
        record("edit", "object", latency_s=2.0, timings={"total": 3.0}, judge=verdict(False)),
        record("edit", "object", latency_s=9.0, judge=verdict(None)),  # unscored: not in the rate
        record("edit", "object", "failed", latency_s=50.0),  # no latency, no verdict of a failed case
        record("edit", "object", judge={"scores": None, "success": None, "error": "judge unreachable"}),
    ]

    summary = summarize(records)

    edit, generate = summary.rows
    assert (edit.task, edit.category, edit.cases, edit.succeeded) == ("edit", "object", 5, 4)
    assert (edit.p50, edit.p95) == (2.0, pytest.approx(8.3))
    assert (edit.scored, edit.judged_successes, edit.unscored, edit.success_rate) == (2, 1, 1, 0.5)
    assert (generate.cases, generate.success_rate) == (1, 1.0)
    assert (summary.total.cases, summary.total.succeeded, summary.total.scored) == (6, 5, 3)
    assert summary.gpu_s_per_case == 2.0  # (2 + 1 + 3) / 3 cases with timings
    table = format_table(summary)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "category", "cases", "succeeded", "p50", "s", "p95", "s", "judged",
                                "success"]  # fmt: skip
    assert lines[2].split() == ["edit", "object", "5", "4", "2.00", "8.30", "1/2", "(50%)", "+1", "unscored"]
    assert lines[4].split()[:4] == ["all", "all", "6", "5"]
    assert "GPU seconds per case: 2.00" in lines[5]


def test_throughput_counts_this_runs_jobs_over_their_span():
    records = [
        record("edit", "a", created_at="2026-01-01T10:00:00+00:00", finished_at="2026-01-01T10:00:30+00:00",
               run="now"),
        record("edit", "a", created_at="2026-01-01T10:00:10+00:00", finished_at="2026-01-01T10:01:00+00:00",
               run="now"),
        record("edit", "a", created_at="2025-01-01T10:00:00+00:00", finished_at="2025-01-01T10:00:05+00:00",
               run="before"),
    ]  # fmt: skip
    summary = summarize(records, run_id="now")
    assert (summary.jobs_per_minute, summary.jobs_this_run) == (2.0, 2)
    assert summarize(records, run_id="none").jobs_per_minute is None
    assert "jobs per minute: -" in format_table(summarize(records, run_id="none"))


def test_a_verdict_record_keeps_the_scores_or_says_unscored_with_the_raw_answer():
    raw = '{"instruction_following": 4, "consistency": 5, "absence_of_distortion": 4, "reason": "rattan"}'
    scored = verdict_record(parse_judge_answer(raw), raw, "url", model="m")
    assert scored == {"by": "url", "model": "m", "reason": "rattan", "success": True, "unscored": False,
                      "scores": {"instruction_following": 4, "consistency": 5, "absence_of_distortion": 4},
                      "raw": raw, "error": None}  # fmt: skip
    low = raw.replace('"consistency": 5', '"consistency": 3')
    assert verdict_record(parse_judge_answer(low), low, "url")["success"] is False
    cut = raw[:30]
    unscored = verdict_record(parse_judge_answer(cut), cut, "service", job_id="j_1")
    assert (unscored["scores"], unscored["success"], unscored["unscored"], unscored["raw"]) == (
        None,
        None,
        True,
        cut,
    )
    summary = summarize([record("edit", "a", judge=scored), record("edit", "a", judge=unscored)])
    assert (summary.total.scored, summary.total.judged_successes, summary.total.unscored) == (1, 1, 1)


def test_the_endpoint_and_the_answer_text():
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    assert answer_text({"choices": [{"message": {"content": "ok"}}]}) == "ok"
    assert (
        answer_text({"choices": [{"message": {"content": [{"type": "text", "text": "o"}, {"text": "k"}]}}]})
        == "ok"
    )
    for body in ({}, {"choices": []}, {"choices": [{"message": {"content": None}}]}, []):
        with pytest.raises(ValueError):
            answer_text(body)

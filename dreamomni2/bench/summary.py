"""The benchmark's summary: per task x category, cases, succeeded, latency p50/p95 and the judged success
rate; for the whole run, the service's throughput (jobs per minute) and GPU seconds per case."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class SummaryRow:
    """One task x category (or the whole benchmark: task and category `all`)."""

    task: str
    category: str
    cases: int = 0
    succeeded: int = 0
    latencies: list[float] = field(default_factory=list)
    scored: int = 0
    judged_successes: int = 0
    unscored: int = 0

    @property
    def p50(self) -> float | None:
        return percentile(self.latencies, 50)

    @property
    def p95(self) -> float | None:
        return percentile(self.latencies, 95)

    @property
    def success_rate(self) -> float | None:
        """Judged successes over the cases the judge scored (unscored answers left out); None if none."""
        return self.judged_successes / self.scored if self.scored else None

    def add(self, record: dict[str, Any]) -> None:
        self.cases += 1
        if record.get("status") != "succeeded":
            return
        self.succeeded += 1
        if isinstance(record.get("latency_s"), int | float):
            self.latencies.append(float(record["latency_s"]))
        verdict = record.get("judge")
        if not isinstance(verdict, dict) or verdict.get("error") is not None:
            return
        if verdict.get("success") is None:
            self.unscored += 1
        else:
            self.scored += 1
            self.judged_successes += bool(verdict["success"])


@dataclass
class Summary:
    """The rows (by task, then category), the total, and the run's service figures."""

    rows: list[SummaryRow]
    total: SummaryRow
    jobs_per_minute: float | None
    gpu_s_per_case: float | None
    jobs_this_run: int


def _time(value: object) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def throughput(records: Iterable[dict[str, Any]]) -> tuple[float | None, int]:
    """Jobs per minute over the given records' jobs: ended jobs over the span from the first one's
    creation to the last one's end (the service's own clock); and how many jobs that is."""
    spans = [(_time(r.get("created_at")), _time(r.get("finished_at"))) for r in records if r.get("job_id")]
    spans = [(start, end) for start, end in spans if start is not None and end is not None]
    if not spans:
        return None, 0
    seconds = (max(end for _, end in spans) - min(start for start, _ in spans)).total_seconds()
    return (len(spans) * 60.0 / seconds if seconds > 0 else None), len(spans)


def summarize(records: list[dict[str, Any]], run_id: str | None = None) -> Summary:
    """The summary of results.jsonl's records; throughput counts the jobs of run `run_id` only (a
    resumed run's earlier jobs ran at another time), GPU seconds every succeeded case's."""
    rows: dict[tuple[str, str], SummaryRow] = {}
    total = SummaryRow("all", "all")
    for record in records:
        key = (str(record.get("task")), str(record.get("category")))
        rows.setdefault(key, SummaryRow(*key)).add(record)
        total.add(record)
    rate, jobs = throughput(r for r in records if run_id is None or r.get("run") == run_id)
    totals = [(r.get("timings") or {}).get("total") for r in records if r.get("status") == "succeeded"]
    gpu = [float(total) for total in totals if isinstance(total, int | float)]
    return Summary(
        rows=[rows[key] for key in sorted(rows, key=lambda k: (k[0] != "edit", k))],
        total=total,
        jobs_per_minute=rate,
        gpu_s_per_case=sum(gpu) / len(gpu) if gpu else None,
        jobs_this_run=jobs,
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def judged_text(row: SummaryRow) -> str:
    """`3/4 (75%)`, `-` when nothing was scored; unscored answers noted."""
    if row.success_rate is None:
        text = "-"
    else:
        text = f"{row.judged_successes}/{row.scored} ({row.success_rate:.0%})"
    return text + (f" +{row.unscored} unscored" if row.unscored else "")


def table_rows(summary: Summary) -> list[list[str]]:
    """The table's header and rows, as text."""
    header = ["task", "category", "cases", "succeeded", "p50 s", "p95 s", "judged success"]
    body = [
        [row.task, row.category, str(row.cases), str(row.succeeded), _seconds(row.p50), _seconds(row.p95),
         judged_text(row)]
        for row in [*summary.rows, summary.total]
    ]  # fmt: skip
    return [header, *body]


def format_table(summary: Summary) -> str:
    """The summary as a plain-text table, then the service figures."""
    rows = table_rows(summary)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    lines.insert(1, "  ".join("-" * width for width in widths))
    rate = "-" if summary.jobs_per_minute is None else f"{summary.jobs_per_minute:.2f}"
    lines.append(
        f"jobs per minute: {rate} ({summary.jobs_this_run} job(s) this run); "
        f"GPU seconds per case: {_seconds(summary.gpu_s_per_case)} (the jobs' timings.total)"
    )
    return "\n".join(lines)

"""`dreamomni2 bench BENCH_DIR OUT_DIR`: the command's body (its arguments are wired in `dreamomni2.cli`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dreamomni2.aio import AsyncClient
from dreamomni2.bench.discovery import BenchCase, BenchLayoutError, CaseProblem, discover
from dreamomni2.bench.judge_client import JUDGE_API_KEY_ENV, ChatJudge
from dreamomni2.bench.judging import ServiceJudge
from dreamomni2.bench.report import write_report
from dreamomni2.bench.results import BenchFolder, SamplingOptions
from dreamomni2.bench.runner import CaseOutcome, Judge, plan_bench, run_bench
from dreamomni2.bench.summary import Summary, format_table, judged_text, summarize
from dreamomni2.cli_common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, print_json, say
from dreamomni2.client import Client


def select_cases(cases: list[BenchCase], only: list[str] | None, limit: int | None) -> list[BenchCase]:
    """The cases of the categories named (all if none), the first `limit` of them; raises ValueError
    naming the categories there are when one named is not among them."""
    if only:
        known = sorted({case.category for case in cases})
        unknown = [name for name in only if name not in known]
        if unknown:
            raise ValueError(f"no category {', '.join(unknown)} in the benchmark; it has {', '.join(known)}")
        cases = [case for case in cases if case.category in only]
    return cases[:limit] if limit is not None else cases


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    return SamplingOptions(
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        size=args.size,
        output_format=args.format,
        step_cache=args.step_cache,
        translate=False if args.no_translate else None,
        loras=tuple((lora.name, lora.scale) for lora in args.loras) if args.loras else None,
    )


class BenchProgress:
    """Progress on stderr: a bar of cases on a terminal, a line per case otherwise."""

    def __init__(self, total: int, quiet: bool) -> None:
        self._bar: tqdm | None = None
        self._lines = not quiet and not sys.stderr.isatty()
        if not quiet and not self._lines:
            self._bar = tqdm(total=total, desc="cases", unit="case", file=sys.stderr, dynamic_ncols=True)
        self._total = total
        self._count = 0

    def __call__(self, outcome: CaseOutcome) -> None:
        self._count += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self._lines:
            record = outcome.record or {}
            what = outcome.message if outcome.status == "failed" else record.get("job_id")
            print(f"[{self._count}/{self._total}] {outcome.case.case_id}: {outcome.status} ({what})",
                  file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def make_judge(args: argparse.Namespace, client: AsyncClient, folder: BenchFolder) -> Judge | None:
    """The judge `--judge` (the service's) or `--judge-url` (an external endpoint) names; None without."""
    if args.judge:
        return ServiceJudge(client, folder, timeout=args.timeout)
    if args.judge_url:
        api_key = args.judge_api_key or os.environ.get(JUDGE_API_KEY_ENV) or None
        return ChatJudge(args.judge_url, model=args.judge_model, api_key=api_key)
    return None


def summary_json(summary: Summary, folder: BenchFolder, failed: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [{"task": row.task, "category": row.category, "cases": row.cases, "succeeded": row.succeeded,
             "latency_p50_s": row.p50, "latency_p95_s": row.p95, "judged": row.scored,
             "judged_successes": row.judged_successes, "judged_success_rate": row.success_rate,
             "unscored": row.unscored, "judged_text": judged_text(row)}
            for row in [*summary.rows, summary.total]]  # fmt: skip
    return {"rows": rows, "jobs_per_minute": summary.jobs_per_minute, "jobs_this_run": summary.jobs_this_run,
            "gpu_s_per_case": summary.gpu_s_per_case, "results": str(folder.results),
            "report": str(folder.report), "failures": failed}  # fmt: skip


def run_bench_command(client: Client, args: argparse.Namespace) -> int:
    """Run the benchmark (see `dreamomni2 bench --help`); the exit code."""
    # The cases go through an AsyncClient (`client` stays unused): asyncio bounds the concurrency.
    # The CLI's exit codes and printers, imported here: `dreamomni2.cli` imports this module.

    try:
        found, problems = discover(args.bench_dir)
        cases = select_cases(found, args.only, args.limit)
    except (BenchLayoutError, ValueError, OSError) as error:
        say(f"dreamomni2: {error}")
        return EXIT_USAGE
    for problem in problems:
        say(f"dreamomni2: skipped {problem}")
    if not cases:
        say(f"dreamomni2: no case to run in {args.bench_dir}")
        return EXIT_FAILED if problems else EXIT_USAGE
    options = sampling_options(args)
    folder = BenchFolder(args.out_dir)
    judge_kind = "service" if args.judge else "url" if args.judge_url else None
    plan = plan_bench(cases, folder, options, judge=judge_kind)
    display = BenchProgress(len(plan.todo), args.quiet)
    ended: list[CaseOutcome] = []

    def on_outcome(outcome: CaseOutcome) -> None:
        ended.append(outcome)
        display(outcome)

    async def run() -> list[CaseOutcome]:
        async with AsyncClient(args.server, args.api_key) as cases_client:
            judge = make_judge(args, cases_client, folder)
            try:
                return await run_bench(cases_client, plan, folder, options, concurrency=args.concurrency,
                                       timeout=args.timeout, judge=judge, on_outcome=on_outcome)  # fmt: skip
            finally:
                if isinstance(judge, ChatJudge):
                    await judge.aclose()

    try:
        outcomes = asyncio.run(run())
    except KeyboardInterrupt:
        display.close()
        folder.compact([case.case_id for case in cases])
        say(f"\ninterrupted after {len(ended)} of {len(plan.todo)} case(s); run the same command again to "
            "go on (finished cases are skipped, submitted ones picked up)")  # fmt: skip
        return EXIT_INTERRUPTED
    finally:
        display.close()
    return report_run(folder, cases, outcomes, problems, plan.run_id, args)


def report_run(
    folder: BenchFolder,
    cases: list[BenchCase],
    outcomes: list[CaseOutcome],
    problems: list[CaseProblem],
    run_id: str,
    args: argparse.Namespace,
) -> int:
    """Compact results.jsonl, write report.html, print the summary table (or --json); the exit code."""

    selected = {case.case_id for case in cases}
    records = [r for r in folder.compact([case.case_id for case in cases]) if r["case_id"] in selected]
    summary = summarize(records, run_id)
    write_report(folder.report, records, summary, f"DreamOmni2Bench: {Path(args.bench_dir).name}")
    failed = [{"case_id": o.case.case_id, "message": o.message, "code": getattr(o.error, "code", None)}
              for o in outcomes if o.status == "failed"]  # fmt: skip
    failed += [
        {"case_id": None, "where": p.where, "message": p.message, "code": "invalid_case"} for p in problems
    ]
    if args.json:
        print_json(summary_json(summary, folder, failed))
    else:
        print(format_table(summary), flush=True)
        counts = {s: sum(o.status == s for o in outcomes) for s in ("succeeded", "skipped", "failed")}
        print(f"ran {counts['succeeded']}, skipped {counts['skipped']}, failed {counts['failed']}; "
              f"results {folder.results}; report {folder.report}", flush=True)  # fmt: skip
        for failure in failed:
            print(f"{failure['case_id'] or failure['where']}: {failure['message']}", flush=True)
        verdicts = {r["case_id"]: r.get("judge") for r in records}
        unjudged = [case_id for case_id, v in verdicts.items() if isinstance(v, dict) and v.get("error")]
        if unjudged:
            print(f"the judge gave no answer for {len(unjudged)} case(s) ({', '.join(unjudged)}); run the "
                  "same command again to judge them", flush=True)  # fmt: skip
    return EXIT_FAILED if failed else EXIT_OK

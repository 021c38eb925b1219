"""The options of the `dreamomni2` command's job commands (edit, generate, mix, dataset, bench)."""

from __future__ import annotations

import argparse

from api_schemas.api import OutputFormat
from api_schemas.common import MixBlocks, StepCache
from dreamomni2._core import API_KEY_ENV, DEFAULT_SERVER, SERVER_ENV
from dreamomni2.bench.command import run_bench_command
from dreamomni2.bench.judge_client import JUDGE_API_KEY_ENV

# Exit codes: one per kind of outcome a script may branch on.
from dreamomni2.cli_common import (
    EXIT_TIMEOUT,
    fraction,
    lora_option,
    non_negative_int,
    positive_int,
    size,
    webhook_events,
)


def add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every command takes, before or after its name.

    On the subcommands their defaults are suppressed, so that an option given before the command
    name is not reset by the subcommand's default.
    """

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("common options")
    group.add_argument(
        "--server",
        metavar="URL",
        default=default(None),
        help=f"the service (${SERVER_ENV}; {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--api-key", metavar="KEY", default=default(None), help=f"the API key (${API_KEY_ENV})"
    )
    group.add_argument(
        "--json", action="store_true", default=default(False), help="print the job (or events) as JSON"
    )
    group.add_argument("-q", "--quiet", action="store_true", default=default(False), help="no progress")
    group.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=default(None),
        help=f"stop waiting for the job after S seconds (exit {EXIT_TIMEOUT}; the job goes on)",
    )


def add_job_options(parser: argparse.ArgumentParser, generation: bool, mixing: bool = False) -> None:
    group = parser.add_argument_group("job options")
    if mixing:
        group.add_argument("-o", "--output", metavar="PATH", help="where to save the pair: -o out.png "
                           "saves out-source.png and out-target.png; -o DIR (a folder) saves "
                           "DIR/<job id>-source.<format>, ...; default <job id>-source.<format>, ...",
                           )  # fmt: skip
    else:
        group.add_argument("-o", "--output", metavar="PATH", help="where to save the image ('-': stdout; "
                           "default <job id>.<format>)")  # fmt: skip
    group.add_argument("--no-wait", action="store_true", help="print the job id (or job) and exit; no image")
    add_sampling_options(group, generation, "random seed (default: a random one, reported back)")
    if not mixing:
        add_instruction_options(group)
        group.add_argument(
            "-n",
            "--num-images",
            type=int,
            metavar="N",
            help="sample N images (seeds seed, seed+1, ...; default 1); -o out.png saves out-0.png, "
            "out-1.png, ...",
        )
    add_delivery_options(group)


def add_sampling_options(group: argparse._ArgumentGroup, generation: bool, seed_help: str) -> None:
    group.add_argument("--seed", type=non_negative_int, help=seed_help)
    group.add_argument("--steps", type=int, help="denoising steps (default: the deployment's, 30)")
    group.add_argument("--guidance", type=float, help="guidance scale (default: the deployment's, 3.5)")
    if generation:
        group.add_argument("--size", type=size, metavar="WxH", help="output aspect, e.g. 1024x768 (~1 MP)")
    group.add_argument("--format", choices=[f.value for f in OutputFormat], help="image format (default png)")


def add_instruction_options(group: argparse._ArgumentGroup) -> None:
    """The options of jobs with an instruction (`edit`, `generate`, `bench`): step cache, no translation,
    LoRAs."""
    group.add_argument(
        "--lora",
        dest="loras",
        action="append",
        type=lora_option,
        metavar="NAME[:SCALE]",
        help="stack a LoRA the deployment registered (GET /v1/service lists them), at SCALE "
        "(default: its own); repeat for several, applied in order",
    )
    group.add_argument(
        "--step-cache",
        choices=[c.value for c in StepCache],
        help="reuse work across steps (faster, lossy)",
    )
    group.add_argument(
        "--no-translate", action="store_true", help="sample with the instruction as is (no VLM rewrite)"
    )


def add_mixing_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--mix-blocks",
        choices=[b.value for b in MixBlocks],
        help="the transformer blocks that mix (default all; none: the target is a plain generation)",
    )
    group.add_argument(
        "--mix-steps", type=fraction, metavar="F", help="fraction of the denoising steps that mix, 0..1 (1)"
    )
    group.add_argument(
        "--mix-strength",
        type=fraction,
        metavar="F",
        help="how much the target attends to the source, 0..1 (1)",
    )


def add_delivery_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--webhook-url", metavar="URL", help="POST signed job events there")
    group.add_argument(
        "--webhook-events", type=webhook_events, metavar="E,E", help="started,progress,completed (completed)"
    )
    group.add_argument("--deadline", type=float, metavar="S", help="cancel it unrun if not started in S s")
    group.add_argument(
        "--idempotency-key", metavar="KEY", help="resubmitting with the same key: the same job"
    )


BENCH_HELP = (
    "Run DreamOmni2Bench through the service: every case of BENCH_DIR (editing_benchmark/<category>/<case>/ "
    "and generation_benchmark/..., each with instruction.txt and its images; or BENCH_DIR/cases.jsonl, "
    'one {"id", "task", "category", "instruction", "images"} per line) is submitted, its output saved in '
    "OUT_DIR/outputs/, a line written to OUT_DIR/results.jsonl, then OUT_DIR/report.html and a summary "
    "table per task x category (cases, succeeded, latency p50/p95, judged success; jobs per minute, GPU "
    "seconds per case). Rerun the same command to resume: finished cases are skipped, submitted ones "
    "picked up (the same job, by an Idempotency-Key), failed ones submitted afresh. Exit 6 if a case failed."
)


def add_bench_command(bench: argparse.ArgumentParser) -> None:
    """`bench`'s arguments; its body is `dreamomni2.bench.command`."""
    bench.add_argument("bench_dir", metavar="BENCH_DIR", help="the benchmark (the DreamOmni2Bench download)")
    bench.add_argument("out_dir", metavar="OUT_DIR", help="where outputs, results.jsonl and report.html go")
    bench.add_argument(
        "--concurrency", type=positive_int, default=4, metavar="N", help="cases in flight at once (4)"
    )
    bench.add_argument("--limit", type=positive_int, metavar="N", help="run the first N cases only")
    bench.add_argument("--only", action="append", metavar="CATEGORY",
                       help="run this category's cases only (repeat for several)")  # fmt: skip
    options = bench.add_argument_group("job options (every case)")
    add_sampling_options(options, True, "seed of every case (default: random per case, recorded)")
    add_instruction_options(options)
    judging = bench.add_argument_group("judging (success: every score above 3, as the paper counts)")
    judge = judging.add_mutually_exclusive_group()
    judge.add_argument(
        "--judge",
        action="store_true",
        help="judge each output with a `judge` job of the service (the worker's VLM; our prompt, not the "
        "paper's, and a judge weaker than its Gemini 2.5)",
    )
    judge.add_argument("--judge-url", metavar="URL", help="judge with this OpenAI-compatible chat endpoint "
                       "with vision (http://host:8000/v1 of vLLM or SGLang, or a hosted one)")  # fmt: skip
    judging.add_argument("--judge-model", metavar="NAME", help="the --judge-url model (default: its first)")
    judging.add_argument(
        "--judge-api-key", metavar="KEY", help=f"the --judge-url key (${JUDGE_API_KEY_ENV}; none if unset)"
    )
    bench.set_defaults(run=run_bench_command)

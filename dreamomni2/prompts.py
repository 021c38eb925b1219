"""Feature Mixing prompt pairs from attribute keywords: `dreamomni2 prompts ATTRIBUTES.txt -o prompts.jsonl`.

The attributes file holds one keyword a line ("rattan weave", "crossed arms", "bob haircut"; blank lines
and `#` comments skipped, a repeated keyword taken once). Each keyword becomes one `mixing_prompts` job
(`count` = `--per-attribute`), written by the service's language model; each pair it writes becomes a
line of the output, exactly as `dreamomni2 dataset` reads them:

    {"attribute": "rattan weave", "source_prompt": "...", "target_prompt": "..."}

Lines are written in the order of the attributes file, each keyword's as soon as it and those before
it are done, so an interrupted run keeps what it wrote. A keyword the service refuses (too long, say)
or whose job fails is reported by its line number; the others are written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from api_schemas.text_tasks import MixingPrompts
from dreamomni2.aio import AsyncClient
from dreamomni2.cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    existing_file,
    positive_int,
    print_json,
    say,
)
from dreamomni2.client import Client
from dreamomni2.dataset import is_fatal
from dreamomni2.errors import DreamOmni2Error
from dreamomni2.resumable import run_pool

#: Refusals every other keyword would meet too: the run stops instead of failing them one by one.
EVERY_KEYWORD = frozenset({"invalid_count", "translator_unavailable"})


@dataclass(frozen=True)
class Attribute:
    """One keyword of the attributes file; `line` is its line number (from 1)."""

    line: int
    keyword: str


@dataclass
class AttributeOutcome:
    """How one keyword went: its pairs (written), or the error that left it without."""

    attribute: Attribute
    job_id: str | None = None
    pairs: list[dict[str, str]] = field(default_factory=list)
    error: DreamOmni2Error | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


def read_attributes(path: str | Path) -> list[Attribute]:
    """The keywords of an attributes file, in order, each once (blank lines and `#` comments skipped)."""
    seen: set[str] = set()
    attributes = []
    for number, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        keyword = " ".join(text.split())
        if keyword and not keyword.startswith("#") and keyword not in seen:
            seen.add(keyword)
            attributes.append(Attribute(number, keyword))
    return attributes


def prompt_lines(output: MixingPrompts) -> list[dict[str, str]]:
    """A `mixing_prompts` output as lines of a `dreamomni2 dataset` prompts file."""
    return [
        {
            "attribute": output.attribute,
            "source_prompt": pair.source_prompt,
            "target_prompt": pair.target_prompt,
        }
        for pair in output.pairs
    ]


async def write_attribute(
    client: AsyncClient, attribute: Attribute, per_attribute: int, timeout: float | None
) -> AttributeOutcome:
    """One keyword's job, submitted and waited for; its pairs, or the error (fatal ones raised)."""
    outcome = AttributeOutcome(attribute)
    try:
        job = await client.mixing_prompts(attribute.keyword, per_attribute)
        outcome.job_id = job.id
        job = await client.wait(job, timeout=timeout)
    except DreamOmni2Error as error:
        if is_fatal(error) or error.code in EVERY_KEYWORD:
            raise
        outcome.error = error
        return outcome
    if not isinstance(job.output, MixingPrompts):  # a service too old to write pairs
        outcome.error = DreamOmni2Error(f"job {job.id} succeeded without prompt pairs", code="no_output")
    else:
        outcome.pairs = prompt_lines(job.output)
    return outcome


async def write_prompts(
    client: AsyncClient,
    attributes: list[Attribute],
    out: TextIO,
    *,
    per_attribute: int,
    concurrency: int = 4,
    timeout: float | None = None,
    on_outcome: Callable[[AttributeOutcome], object] | None = None,
) -> list[AttributeOutcome]:
    """Write every keyword's pairs to `out` (JSON lines, in the file's order), at most `concurrency`
    jobs at a time. Returns the outcomes in the file's order; raises the first fatal error (`is_fatal`:
    the service unreachable, the key refused) once the jobs in flight are stopped."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be 1 or more; got {concurrency}.")
    done: dict[int, AttributeOutcome] = {}
    written = 0

    def flush() -> None:
        # In the file's order: write each outcome once every one before it is in.
        nonlocal written
        while written in done:
            for line in done[written].pairs:
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            written += 1

    async def write(item: tuple[int, Attribute]) -> None:
        index, attribute = item
        done[index] = await write_attribute(client, attribute, per_attribute, timeout)
        flush()
        if on_outcome is not None:
            on_outcome(done[index])

    await run_pool(enumerate(attributes), concurrency, write)
    return [done[index] for index in range(len(attributes))]


def summary(outcomes: list[AttributeOutcome]) -> dict[str, Any]:
    """Counts and failures, for the command's last line (or its --json)."""
    failed = [o for o in outcomes if o.failed]
    return {
        "attributes": len(outcomes),
        "pairs": sum(len(o.pairs) for o in outcomes),
        "failed": len(failed),
        "failures": [
            {"line": o.attribute.line, "attribute": o.attribute.keyword, "job_id": o.job_id,
             "code": o.error.code if o.error else None, "message": str(o.error)}
            for o in failed
        ],
    }  # fmt: skip


# The command -------------------------------------------------------------------------------------------
PROMPTS_HELP = (
    "Write Feature Mixing prompt pairs from attribute keywords: each line of ATTRIBUTES.txt (a keyword such "
    'as "rattan weave"; blank lines and # comments skipped) becomes a mixing_prompts job of the service, '
    "whose language model writes --per-attribute (source, target) pairs in the paper's way: the source "
    "shows the attribute on one subject, the target names another subject that should take it. The pairs "
    'go to -o as JSON lines {"attribute", "source_prompt", "target_prompt"}, in the file\'s order, which '
    "`dreamomni2 dataset` reads as they are. Exit 6 if a keyword failed (the others are written)."
)


def add_prompts_command(parser: argparse.ArgumentParser) -> None:
    """`prompts`'s arguments (the parser `dreamomni2.cli` made for it)."""

    parser.add_argument("attributes", type=existing_file, metavar="ATTRIBUTES.txt", help="one keyword a line")
    parser.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        default="-",
        help="the prompts file to write ('-': stdout, the default)",
    )
    parser.add_argument(
        "--per-attribute", type=positive_int, default=4, metavar="N", help="pairs per keyword (4)"
    )
    parser.add_argument(
        "--concurrency", type=positive_int, default=4, metavar="N", help="keywords in flight at once (4)"
    )
    parser.set_defaults(run=run_prompts_command)


def run_prompts_command(client: Client, args: argparse.Namespace) -> int:
    """Run `dreamomni2 prompts` (see its --help); the exit code."""

    attributes = read_attributes(args.attributes)
    if not attributes:
        say(f"dreamomni2: no attribute keyword in {args.attributes}")
        return EXIT_USAGE
    to_stdout = args.output == "-"
    show = None if args.quiet else (lambda outcome: say(_describe(outcome)))

    async def write(out: TextIO) -> list[AttributeOutcome]:
        # The keywords go through an AsyncClient (`client` stays unused): asyncio bounds the concurrency.
        async with AsyncClient(args.server, args.api_key) as jobs_client:
            return await write_prompts(
                jobs_client,
                attributes,
                out,
                per_attribute=args.per_attribute,
                concurrency=args.concurrency,
                timeout=args.timeout,
                on_outcome=show,
            )

    try:
        if to_stdout:
            outcomes = asyncio.run(write(sys.stdout))
        else:
            with open(args.output, "w", encoding="utf-8") as out:
                outcomes = asyncio.run(write(out))
    except KeyboardInterrupt:
        say("\ninterrupted; the keywords done so far are written")
        return EXIT_INTERRUPTED
    result = summary(outcomes)
    if args.json and not to_stdout:
        print_json({**result, "output": args.output})
    else:
        where = "stdout" if to_stdout else args.output
        written = result["attributes"] - result["failed"]
        say(f"{result['pairs']} pair(s) for {written} of {result['attributes']} keyword(s) written to "
            f"{where}; failed {result['failed']}")  # fmt: skip
        for failure in result["failures"]:
            say(f"line {failure['line']} ({failure['attribute']}): {failure['message']}")
    return EXIT_FAILED if result["failed"] else EXIT_OK


def _describe(outcome: AttributeOutcome) -> str:
    what = f"{len(outcome.pairs)} pair(s)" if not outcome.failed else f"failed ({outcome.error})"
    return f"line {outcome.attribute.line} ({outcome.attribute.keyword}): {what}"

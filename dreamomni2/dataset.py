"""Feature Mixing datasets: a JSONL file of prompt pairs in; a folder of image pairs and a manifest out.

Each line of the prompts file is one pair (blank lines and `#` comments are skipped):

    {"attribute": "material", "source_prompt": "a woven straw hat", "target_prompt": "a teapot", "seed": 7}

`seed` is optional. The output folder holds `<pair id>/source.<format>` and `target.<format>` for each
pair, and `manifest.jsonl`: one line per finished pair (prompts, attribute, the seed the job used, its
mixing parameters, steps, guidance, size, job id, and the two files, relative to the folder).

Resuming: a pair's id is the first 16 hex digits of the SHA-256 of the request it sends (its prompts,
attribute and seed, and the mixing and sampling options), so the same line with the same options has
the same id in every run, wherever it is in the file. A run skips the pairs already in the manifest,
and submits every other pair with the Idempotency-Key `dreamomni2-dataset-<dataset id>-<pair id>`: a
pair whose job was submitted by an interrupted run gets that job back instead of a second one. The
dataset id is random, made by the folder's first run (the file `dataset_id`), so that another folder
made from the same prompts gets new jobs (new random seeds), not this one's. A job that failed, was
canceled or expired is noted in `failed_jobs.jsonl`; the next run submits its pair under a new key
(`...-retry<n>`), so failures are retried rather than replayed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dreamomni2.aio import AsyncClient
from dreamomni2.errors import (
    UNREACHABLE,
    AuthenticationError,
    DreamOmni2Error,
    JobError,
    NotFoundError,
    ServiceUnavailableError,
)
from dreamomni2.resumable import ResumableFolder, read_jsonl, run_pool

MANIFEST = "manifest.jsonl"
DATASET_ID = "dataset_id"
LINE_FIELDS = ("attribute", "source_prompt", "target_prompt", "seed")
ROLES = ("source", "target")  # result index 0 and 1


class PromptLineError(ValueError):
    """A line of the prompts file that is not a pair; `line` is its number (from 1)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class PairOptions:
    """What applies to every pair: the mixing parameters and sampling options (None: the deployment's
    default). `seed` is for lines without their own."""

    mix_blocks: str | None = None
    mix_steps: float | None = None
    mix_strength: float | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    size: tuple[int, int] | None = None
    output_format: str | None = None


@dataclass(frozen=True)
class PromptPair:
    """One line of the prompts file."""

    line: int
    source_prompt: str
    target_prompt: str
    attribute: str | None = None
    seed: int | None = None

    def request(self, options: PairOptions) -> dict[str, Any]:
        """The `Client.feature_mix` arguments of this pair under `options` (`size` as a list)."""
        fields: dict[str, Any] = {
            "source_prompt": self.source_prompt,
            "target_prompt": self.target_prompt,
            "attribute": self.attribute,
            **asdict(options),
            "seed": self.seed if self.seed is not None else options.seed,
        }
        # One spelling per value, so that the id does not depend on how an option was typed.
        for name in ("mix_steps", "mix_strength", "guidance"):
            if fields[name] is not None:
                fields[name] = float(fields[name])
        if fields["size"] is not None:
            fields["size"] = list(fields["size"])
        return fields

    def pair_id(self, options: PairOptions) -> str:
        """The pair's stable id: a hash of the request it sends (see the module's docstring)."""
        text = json.dumps(self.request(options), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_line(number: int, text: str) -> PromptPair | None:
    """The pair on a line; None for a blank line or a `#` comment. Raises PromptLineError."""
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise PromptLineError(number, f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise PromptLineError(number, f"expected a JSON object like {{{', '.join(LINE_FIELDS)}}}")
    unknown = sorted(set(value) - set(LINE_FIELDS))
    if unknown:
        raise PromptLineError(
            number, f"unknown field(s) {', '.join(unknown)}; a line takes {', '.join(LINE_FIELDS)}"
        )
    for name in ("source_prompt", "target_prompt"):
        if not isinstance(value.get(name), str) or not value[name].strip():
            raise PromptLineError(number, f"{name} is missing or empty")
    attribute, seed = value.get("attribute"), value.get("seed")
    if attribute is not None and not isinstance(attribute, str):
        raise PromptLineError(number, "attribute must be a string")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise PromptLineError(number, f"seed must be a whole number, 0 or more; got {seed!r}")
    return PromptPair(number, value["source_prompt"], value["target_prompt"], attribute, seed)


def read_prompts(path: str | Path) -> tuple[list[PromptPair], list[PromptLineError]]:
    """The pairs of a prompts file, and the lines that are not pairs (each naming its line)."""
    pairs: list[PromptPair] = []
    errors: list[PromptLineError] = []
    with open(path, encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            try:
                pair = parse_line(number, text)
            except PromptLineError as error:
                errors.append(error)
            else:
                if pair is not None:
                    pairs.append(pair)
    return pairs, errors


class DatasetFolder(ResumableFolder):
    """The output folder: the pairs' folders, `manifest.jsonl` and `failed_jobs.jsonl`."""

    id_file = DATASET_ID
    key_prefix = "dreamomni2-dataset"
    item_field = "pair_id"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.manifest = self.root / MANIFEST

    def finished(self) -> dict[str, dict[str, Any]]:
        """The manifest's records by pair id."""
        return {r["pair_id"]: r for r in read_jsonl(self.manifest) if isinstance(r.get("pair_id"), str)}

    def add(self, record: dict[str, Any]) -> None:
        self.append(self.manifest, record)


@dataclass
class PairOutcome:
    """What became of one line: `done`, `skipped` (in the manifest, or a repeat of an earlier line) or
    `failed` (`error` says why)."""

    line: int
    status: str
    pair_id: str | None = None
    record: dict[str, Any] | None = None
    error: DreamOmni2Error | OSError | PromptLineError | None = None
    note: str = ""

    @property
    def message(self) -> str:
        if isinstance(self.error, PromptLineError):
            return self.error.message
        return str(self.error) if self.error is not None else self.note


@dataclass
class DatasetPlan:
    """The pairs to make and the lines that need nothing (or cannot be made) before anything is sent."""

    todo: list[tuple[PromptPair, str]] = field(default_factory=list)
    outcomes: list[PairOutcome] = field(default_factory=list)


def plan_dataset(
    pairs: Iterable[PromptPair],
    bad_lines: Iterable[PromptLineError],
    folder: DatasetFolder,
    options: PairOptions,
) -> DatasetPlan:
    """Which pairs to make: not those in the manifest, and each repeated line once."""
    plan = DatasetPlan()
    plan.outcomes += [PairOutcome(error.line, "failed", error=error) for error in bad_lines]
    finished = folder.finished()
    first_line: dict[str, int] = {}
    for pair in pairs:
        pair_id = pair.pair_id(options)
        if pair_id in finished:
            plan.outcomes.append(
                PairOutcome(pair.line, "skipped", pair_id, finished[pair_id], note="done before")
            )
        elif pair_id in first_line:
            note = f"the same pair as line {first_line[pair_id]}"
            plan.outcomes.append(PairOutcome(pair.line, "skipped", pair_id, note=note))
        else:
            first_line[pair_id] = pair.line
            plan.todo.append((pair, pair_id))
    return plan


def is_fatal(error: BaseException) -> bool:
    """An error every other pair would meet too: stop instead of failing them one by one."""
    return isinstance(error, AuthenticationError) or (
        isinstance(error, ServiceUnavailableError) and error.code == UNREACHABLE
    )


async def make_pair(
    client: AsyncClient,
    pair: PromptPair,
    pair_id: str,
    folder: DatasetFolder,
    options: PairOptions,
    *,
    key: str,
    timeout: float | None = None,
) -> PairOutcome:
    """Submit one pair (or get its earlier job back), wait for it, save both images; the outcome.

    Raises the errors `is_fatal` names; returns every other as a failed outcome.
    """
    request = pair.request(options)
    size = request.pop("size")
    job_id = None
    try:
        job = await client.feature_mix(**request, size=tuple(size) if size else None, idempotency_key=key)
        job_id = job.id
        job = await client.wait(job, timeout=timeout)
        pair_dir = folder.root / pair_id
        pair_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        for index, role in enumerate(ROLES):
            path = pair_dir / f"{role}.{job.output_format.value}"
            path.write_bytes(await client.result_bytes(job, index))
            files[role] = path.relative_to(folder.root).as_posix()
    except (DreamOmni2Error, OSError) as error:
        if is_fatal(error):
            raise
        if isinstance(error, JobError | NotFoundError) and job_id is not None:
            # The job is over without a usable result: the next run submits the pair afresh.
            failed = {"pair_id": pair_id, "line": pair.line, "job_id": job_id, "idempotency_key": key}
            folder.add_failed_job({**failed, "code": getattr(error, "code", None), "message": str(error)})
        return PairOutcome(pair.line, "failed", pair_id, error=error)
    result = job.results[0] if job.results else job.result
    record = {
        "pair_id": pair_id,
        "line": pair.line,
        "attribute": job.attribute,
        "source_prompt": job.source_prompt,
        "target_prompt": job.target_prompt,
        "seed": job.seed,
        "mixing": job.mixing,
        "steps": job.steps,
        "guidance": job.guidance,
        "size": [result.width, result.height] if result else None,
        "output_format": job.output_format.value,
        "job_id": job.id,
        **files,
    }
    return PairOutcome(pair.line, "done", pair_id, record)


async def make_dataset(
    client: AsyncClient,
    plan: DatasetPlan,
    folder: DatasetFolder,
    options: PairOptions,
    *,
    concurrency: int = 4,
    timeout: float | None = None,
    on_outcome: Callable[[PairOutcome], object] | None = None,
) -> list[PairOutcome]:
    """Make the plan's pairs, at most `concurrency` at a time; each finished pair goes into the
    manifest as it finishes. Returns the outcomes of every line (the plan's own first), by line.

    Raises the first fatal error (`is_fatal`) once the pairs in flight are stopped.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be 1 or more; got {concurrency}.")
    outcomes = list(plan.outcomes)
    failures = folder.failures()

    async def make(item: tuple[PromptPair, str]) -> None:
        pair, pair_id = item
        key = folder.idempotency_key(pair_id, failures[pair_id])
        outcome = await make_pair(client, pair, pair_id, folder, options, key=key, timeout=timeout)
        if outcome.record is not None:
            folder.add(outcome.record)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    await run_pool(plan.todo, concurrency, make)
    return sorted(outcomes, key=lambda outcome: outcome.line)

"""The benchmark's output folder: results.jsonl, the saved outputs, and what makes a rerun resume.

A case's key is the first 16 hex digits of the SHA-256 of what it sends (its id, task, instruction,
the digests of its images, and the sampling options), so a rerun with the same options finds it
again. Each case is submitted with `Idempotency-Key: dreamomni2-bench-<bench id>-<case key>`: a case
whose job an interrupted run had submitted gets that job back. The bench id is random, made by the
folder's first run (the file `bench_id`). A job that failed or expired is logged in
`failed_jobs.jsonl` and the next run submits its case under a new key (`...-retry<n>`).

`results.jsonl` is appended to as each case ends, and rewritten at the end of a run with one line per
case (the latest), in the benchmark's order.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from api_schemas.common import Task
from dreamomni2.bench.discovery import BenchCase
from dreamomni2.resumable import ResumableFolder, read_jsonl

RESULTS = "results.jsonl"
BENCH_ID = "bench_id"
OUTPUTS = "outputs"
REPORT = "report.html"


@dataclass(frozen=True)
class SamplingOptions:
    """What applies to every case (None: the deployment's default). `size` applies to generation only:
    an edit keeps the size of its image 1."""

    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    size: tuple[int, int] | None = None
    output_format: str | None = None
    step_cache: str | None = None
    translate: bool | None = None
    #: (name, scale) of each LoRA stacked on every case, in order (scale None: the LoRA's default).
    loras: tuple[tuple[str, float | None], ...] | None = None

    def submit_arguments(self, case: BenchCase) -> dict[str, Any]:
        """`AsyncClient.submit`'s arguments for `case`, its idempotency key aside."""
        return {
            "instruction": case.instruction,
            "images": list(case.images),
            "task": case.task,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "size": self.size if case.task is Task.GENERATE else None,
            "output_format": self.output_format,
            "step_cache": self.step_cache,
            "translate": self.translate,
            "loras": [{"name": name, "scale": scale} for name, scale in self.loras] if self.loras else None,
        }


def case_key(case: BenchCase, options: SamplingOptions) -> str:
    """The case's stable key under these options (see the module's docstring)."""
    fields = asdict(options)
    fields["size"] = list(options.size) if options.size and case.task is Task.GENERATE else None
    if fields["guidance"] is not None:
        fields["guidance"] = float(fields["guidance"])  # one spelling: 3 and 3.0 are one request
    what = {"id": case.case_id, "task": case.task.value, "instruction": case.instruction,
            "images": list(case.digests), **fields}  # fmt: skip
    text = json.dumps(what, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class BenchFolder(ResumableFolder):
    """OUT_DIR: `results.jsonl`, `failed_jobs.jsonl`, `bench_id`, `outputs/<case id>.<format>`, and
    `report.html`."""

    id_file = BENCH_ID
    key_prefix = "dreamomni2-bench"
    item_field = "case_key"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.results = self.root / RESULTS
        self.report = self.root / REPORT

    def output_path(self, case: BenchCase, output_format: str) -> Path:
        """Where a case's output goes: `outputs/<case id>.<format>` (a case id is a safe relative path)."""
        return self.root / OUTPUTS / f"{case.case_id}.{output_format}"

    def records(self) -> dict[str, dict[str, Any]]:
        """The latest record of each case, by case id."""
        latest: dict[str, dict[str, Any]] = {}
        for record in read_jsonl(self.results):
            if isinstance(record.get("case_id"), str):
                latest[record["case_id"]] = record
        return latest

    def finished(self, case: BenchCase, key: str) -> dict[str, Any] | None:
        """The case's record if it succeeded under this key and its output is still there."""
        record = self.records().get(case.case_id)
        if record is None or record.get("case_key") != key or record.get("status") != "succeeded":
            return None
        output = record.get("output")
        return record if isinstance(output, str) and (self.root / output).is_file() else None

    def add(self, record: dict[str, Any]) -> None:
        self.append(self.results, record)

    def compact(self, order: list[str]) -> list[dict[str, Any]]:
        """Rewrite results.jsonl with one line per case (the latest), cases of `order` first in that
        order, then any others; returns those records. Written aside and renamed: never half-written."""
        latest = self.records()
        ranked = {case_id: index for index, case_id in enumerate(order)}
        records = sorted(latest.values(), key=lambda r: (ranked.get(r["case_id"], len(ranked)), r["case_id"]))
        if not records and not self.results.exists():
            return []
        temporary = self.results.with_suffix(".jsonl.tmp")
        with open(temporary, "w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.results)
        return records

"""The GPU suite's results: every row appended the moment it is measured, the JSON file rendered from them.

Each process of the suite (the parent, each section's child, each memory mode's `gpu_baseline.py`)
appends one JSON line per entry to `<out stem>.rows.jsonl` beside the results file (flushed and synced
to disk), then rewrites the results file from all the lines (a temporary file and a rename, so a
reader never sees half of it). A process killed mid-section loses only the row it was measuring; a
torn last line is skipped. Free of torch: the parent never imports it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

#: What an entry is: a measured row, a section's outcome (the parent's), or the suite's own facts.
KINDS = ("row", "section", "suite")


class RowLog:
    """The rows file beside the results file `out`, and the results file rendered from it."""

    def __init__(self, out: Path):
        self.out = out
        self.lines = out.with_name(f"{out.stem}.rows.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)

    def append(self, section: str, name: str, data: dict[str, Any], kind: str = "row") -> None:
        """Record one entry now, and publish the results file with it."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        entry = {"kind": kind, "section": section, "name": name, "time": round(time.time(), 3), "data": data}
        with self.lines.open("a") as file:
            file.write(json.dumps(entry, default=str) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.publish()

    def entries(self) -> list[dict[str, Any]]:
        """Every entry recorded so far, in order; a line a killed process left torn is skipped."""
        if not self.lines.is_file():
            return []
        found = []
        for line in self.lines.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("kind") in KINDS:
                found.append(entry)
        return found

    def render(self) -> dict[str, Any]:
        """`{"suite": {...}, "sections": {section: outcome}, "rows": {section: {name: row}}}`; the
        latest entry of a name wins (a rerun replaces its rows)."""
        result: dict[str, Any] = {"suite": {}, "sections": {}, "rows": {}}
        for entry in self.entries():
            if entry["kind"] == "row":
                result["rows"].setdefault(entry["section"], {})[entry["name"]] = entry["data"]
            elif entry["kind"] == "section":
                result["sections"][entry["section"]] = entry["data"]
            else:
                result["suite"][entry["name"]] = entry["data"]
        return result

    def publish(self) -> None:
        temporary = self.out.with_name(f".{self.out.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.render(), indent=2, default=str))
        os.replace(temporary, self.out)

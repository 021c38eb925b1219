"""What the commands that run many jobs and resume (`dataset`, `bench`, `prompts`) share: JSON-lines
files that survive an interruption, an output folder whose jobs are submitted with stable
idempotency keys, and a bounded pool of concurrent jobs."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

#: Each job that ended without a usable result, one line each: a rerun submits its item afresh.
FAILED_JOBS = "failed_jobs.jsonl"

Item = TypeVar("Item")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The file's JSON objects; nothing for no file; a line cut short by an interruption is skipped."""
    if not path.exists():
        return []
    records = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption: its item is simply done again
        if isinstance(record, dict):
            records.append(record)
    return records


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line, on a line of its own even after a line cut short by an interruption."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    with open(path, "ab+") as file:
        end = file.seek(0, os.SEEK_END)
        if end:
            file.seek(end - 1)
            if file.read(1) != b"\n":
                line = b"\n" + line
        file.write(line)
        file.flush()


class ResumableFolder:
    """An output folder a command resumes: its random id (a file made on first use, `id_file`) keeps
    other folders' idempotency keys apart from this one's, and `failed_jobs.jsonl` counts the failed
    jobs of each item (by its `item_field`), so a rerun gets a submitted job back but retries a
    failed one."""

    #: The file holding the folder's id, and the prefix of its idempotency keys.
    id_file = "folder_id"
    key_prefix = "dreamomni2"
    #: The field of a failed job's record that names its item.
    item_field = "id"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.failed_jobs = self.root / FAILED_JOBS

    def folder_id(self) -> str:
        """The folder's random id, made on first use."""
        path = self.root / self.id_file
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x", encoding="utf-8") as file:
                file.write(uuid.uuid4().hex + "\n")
        except FileExistsError:
            pass
        return path.read_text(encoding="utf-8").strip()

    def idempotency_key(self, item: str, retry: int = 0) -> str:
        """The key an item is submitted with: the same in every run into this folder until a job of the
        item failed (`retry`: how many did)."""
        return f"{self.key_prefix}-{self.folder_id()}-{item}" + (f"-retry{retry}" if retry else "")

    def failures(self) -> Counter[str]:
        """How many jobs of each item ended without a usable result, in earlier runs."""
        return Counter(r[self.item_field] for r in read_jsonl(self.failed_jobs) if self.item_field in r)

    def append(self, path: Path, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        append_jsonl(path, record)

    def add_failed_job(self, record: dict[str, Any]) -> None:
        self.append(self.failed_jobs, record)


async def run_pool(
    items: Iterable[Item], concurrency: int, handle: Callable[[Item], Awaitable[object]]
) -> None:
    """`handle` every item, at most `concurrency` at a time, each worker taking the next item when it is
    free. A worker's error cancels the others and is raised as itself (not as an exception group)."""
    todo = list(items)
    shared = iter(todo)

    async def worker() -> None:
        for item in shared:
            await handle(item)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, len(todo))):
                group.create_task(worker())
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None

"""Finding DreamOmni2Bench's cases: the published folder layout, or a `cases.jsonl` that overrides it.

The published layout (https://huggingface.co/datasets/xiabs/DreamOmni2Bench):

    BENCH_DIR/editing_benchmark/<category>/<case>/instruction.txt + the case's images
    BENCH_DIR/generation_benchmark/<category>/<case>/instruction.txt + the case's images

The category folder names the case's scope (a specific object, or an abstract attribute, local or
global). Which image is image 1 follows the reference code's file names: an edit's source image
(`src`, `source`, `input`) comes first, then the others by the number in their name (`ref_0`,
`ref_1`; `img1`, `img2`); a result image kept beside the inputs (`res`, `result`, `output`, `gt`,
`target`, ...) is not an input. Where the names do not settle the order (two images without a
number, two with the same one, two source images) the case is refused with a message naming its
files: a `cases.jsonl` in BENCH_DIR then says what the folders cannot. Its lines (blank lines and `#`
comments skipped) are

    {"id": "...", "task": "edit" | "generate", "category": "...", "instruction": "...",
     "images": ["relative/to/BENCH_DIR/image1.png", ...], "scope": "..."}   (scope optional)

and when it exists it is the whole benchmark: the folders are not read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from api_schemas.common import Task

CASES_FILE = "cases.jsonl"
TASK_FOLDERS = {"editing_benchmark": Task.EDIT, "generation_benchmark": Task.GENERATE}
INSTRUCTION_FILE = "instruction.txt"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
#: The stems of an edit's image to edit (image 1).
SOURCE_STEMS = frozenset({"src", "source", "input", "origin", "original"})
#: A result kept beside the inputs: not an input (the reference examples keep `res.jpg` there).
_RESULT_STEM = re.compile(r"^(res|result|results|output|out|gt|target|edi_res|edit_res|gen_res)([_-]?\d+)?$")
_TRAILING_NUMBER = re.compile(r"(\d+)$")
#: A case id: also a path under OUT_DIR, so no separators but `/`, no dot-segments.
_ID_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
LINE_FIELDS = ("id", "task", "category", "instruction", "images", "scope")
#: Scopes, from the category folder's name (see `scope_of`).
SCOPES = ("object", "local_attribute", "global_attribute", "abstract_attribute", "unknown")


@dataclass(frozen=True)
class BenchCase:
    """One case: what is asked of the service and where it sits in the benchmark."""

    case_id: str
    task: Task
    category: str
    scope: str
    instruction: str
    images: tuple[Path, ...]
    #: Image files' SHA-256 digests (in order): a changed input makes a new case key.
    digests: tuple[str, ...] = field(default=(), compare=False)

    @property
    def image_count(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class CaseProblem:
    """A case folder or cases.jsonl line that cannot be run, and why (the others still run)."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class AmbiguousOrder(ValueError):
    """The image files' names do not say which is image 1, 2, ...: cases.jsonl must."""


class BenchLayoutError(ValueError):
    """BENCH_DIR holds neither cases.jsonl nor the published folders."""


def scope_of(category: str) -> str:
    """The scope a category's name states: `object` (a specific object or subject), `local_attribute`,
    `global_attribute`, `abstract_attribute` (not said which), or `unknown`."""
    words = set(re.split(r"[^a-z]+", category.lower()))
    if words & {"global"}:
        return "global_attribute"
    if words & {"local"}:
        return "local_attribute"
    if words & {"object", "objects", "concrete", "subject", "subjects", "id", "identity", "specific"}:
        return "object"
    if words & {"abstract", "attribute", "attributes"}:
        return "abstract_attribute"
    return "unknown"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _number(stem: str) -> int | None:
    match = _TRAILING_NUMBER.search(stem)
    return int(match.group(1)) if match else None


def order_images(files: list[Path]) -> list[Path]:
    """The case's input images in order (image 1 first); raises ValueError where the names do not say."""
    inputs = [f for f in files if not _RESULT_STEM.match(f.stem.lower())]
    sources = [f for f in inputs if f.stem.lower() in SOURCE_STEMS]
    if len(sources) > 1:
        raise AmbiguousOrder(f"{_names(sources)} could each be image 1")
    others = [f for f in inputs if f not in sources]
    if len(others) > 1:
        numbers = [_number(f.stem) for f in others]
        unnumbered = [f for f, n in zip(others, numbers, strict=True) if n is None]
        if unnumbered:
            raise AmbiguousOrder(f"{_names(unnumbered)} carry no number to order them by")
        if len(set(numbers)) < len(numbers):
            raise AmbiguousOrder(f"{_names(others)} share numbers, so their order is not given")
        others.sort(key=lambda f: (_number(f.stem), f.name))
    # An edit's image to edit is its source; without one, the first numbered image (ref_0, img1).
    return sources + others


def _names(files: list[Path]) -> str:
    return ", ".join(sorted(f.name for f in files))


def _read_instruction(path: Path) -> str:
    text = path.read_text(encoding="utf-8-sig").strip()
    if not text:
        raise ValueError(f"{INSTRUCTION_FILE} is empty")
    return text


def _folder_case(case_dir: Path, task: Task, category: str) -> BenchCase:
    instruction = _read_instruction(case_dir / INSTRUCTION_FILE)
    files = sorted(p for p in case_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    images = order_images(files)
    if task is Task.EDIT and not images:
        raise ValueError("an edit case needs the image to edit (image 1); the folder has no image")
    case_id = f"{task.value}/{category}/{case_dir.name}"
    return BenchCase(case_id, task, category, scope_of(category), instruction, tuple(images),
                     tuple(_digest(p) for p in images))  # fmt: skip


def task_roots(bench_dir: Path) -> dict[Path, Task]:
    """The published task folders in BENCH_DIR, or in its one sub-folder holding them (a download's
    top folder)."""
    for base in (bench_dir, *sorted(p for p in bench_dir.iterdir() if p.is_dir())):
        found = {base / name: task for name, task in TASK_FOLDERS.items() if (base / name).is_dir()}
        if found:
            return found
    return {}


def discover_folders(bench_dir: Path) -> tuple[list[BenchCase], list[CaseProblem]]:
    """The cases of the published folder layout, in task, category and case order."""
    roots = task_roots(bench_dir)
    if not roots:
        raise BenchLayoutError(
            f"{bench_dir} has neither {CASES_FILE} nor the published folders "
            f"({' and '.join(TASK_FOLDERS)}/<category>/<case>/{INSTRUCTION_FILE} with the case's images); "
            "point BENCH_DIR at the DreamOmni2Bench download, or write a cases.jsonl (see --help)"
        )
    cases: list[BenchCase] = []
    problems: list[CaseProblem] = []
    for root, task in sorted(roots.items(), key=lambda item: item[1] is not Task.EDIT):
        for category_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for case_dir in sorted(
                (p for p in category_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: (_number(p.name) is None, _number(p.name) or 0, p.name),
            ):
                where = str(case_dir.relative_to(bench_dir))
                if not (case_dir / INSTRUCTION_FILE).is_file():
                    problems.append(CaseProblem(where, f"no {INSTRUCTION_FILE}: not a case folder"))
                    continue
                try:
                    cases.append(_folder_case(case_dir, task, category_dir.name))
                except AmbiguousOrder as error:
                    hint = f"list the case with its images in order in BENCH_DIR/{CASES_FILE}"
                    problems.append(CaseProblem(where, f"{error}: {hint}"))
                except (ValueError, OSError) as error:
                    problems.append(CaseProblem(where, str(error)))
    return cases, problems


def _line_case(bench_dir: Path, value: object) -> BenchCase:
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object with {', '.join(LINE_FIELDS[:5])}")
    unknown = sorted(set(value) - set(LINE_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; a line takes {', '.join(LINE_FIELDS)}")
    case_id, category = value.get("id"), value.get("category")
    if not isinstance(case_id, str) or not all(_ID_PART.match(part) for part in case_id.split("/")):
        raise ValueError(
            "id must be a string of letters, digits and . _ + - (parts joined by /, each starting with a "
            f"letter or digit, at most 128 characters); got {case_id!r}"
        )
    try:
        task = Task(value.get("task"))
    except ValueError:
        task = None
    if task not in (Task.EDIT, Task.GENERATE):
        raise ValueError(f"task must be edit or generate; got {value.get('task')!r}")
    if not isinstance(category, str) or not category.strip():
        raise ValueError("category is missing or empty")
    instruction = value.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("instruction is missing or empty")
    images = value.get("images", [])
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise ValueError("images must be a list of file paths (relative to BENCH_DIR), image 1 first")
    if task is Task.EDIT and not images:
        raise ValueError("an edit case needs the image to edit (image 1)")
    paths = [bench_dir / image for image in images]
    missing = [image for image, path in zip(images, paths, strict=True) if not path.is_file()]
    if missing:
        raise ValueError(f"no such image file(s): {', '.join(missing)}")
    scope = value.get("scope") or scope_of(category)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    return BenchCase(case_id, task, category.strip(), scope, instruction.strip(), tuple(paths),
                     tuple(_digest(p) for p in paths))  # fmt: skip


def read_cases_file(bench_dir: Path) -> tuple[list[BenchCase], list[CaseProblem]]:
    """The cases of BENCH_DIR/cases.jsonl, in file order; a bad line is a problem naming its number."""
    cases: list[BenchCase] = []
    problems: list[CaseProblem] = []
    seen: dict[str, int] = {}
    path = bench_dir / CASES_FILE
    for number, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{CASES_FILE} line {number}"
        try:
            case = _line_case(bench_dir, json.loads(stripped))
        except json.JSONDecodeError as error:
            problems.append(CaseProblem(where, f"not JSON ({error.msg} at column {error.colno})"))
            continue
        except (ValueError, OSError) as error:
            problems.append(CaseProblem(where, str(error)))
            continue
        if case.case_id in seen:
            problems.append(CaseProblem(where, f"id {case.case_id} is also line {seen[case.case_id]}'s"))
            continue
        seen[case.case_id] = number
        cases.append(case)
    return cases, problems


def discover(bench_dir: str | Path) -> tuple[list[BenchCase], list[CaseProblem]]:
    """Every case of the benchmark at `bench_dir` (cases.jsonl if present, else the folders) and the
    cases that cannot run. Raises BenchLayoutError when it holds neither."""
    root = Path(bench_dir)
    if not root.is_dir():
        raise BenchLayoutError(f"no such folder: {root}")
    if (root / CASES_FILE).is_file():
        return read_cases_file(root)
    return discover_folders(root)

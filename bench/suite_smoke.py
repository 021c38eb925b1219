"""The GPU suite's import smoke test: every version that matters, then the project's import chain.

    python bench/suite_smoke.py --shapes full --out out/suite.json [--fp8-site /tmp/site-fp8]

`bench/gpu_suite.py` runs it first, in its own process under a hard timeout (10 s by default), so
a missing or mismatched wheel costs seconds of device time instead of a section. It prints each
step as it starts (a hang shows where it was) and records one `versions` row: Python, torch and its
CUDA, each library's version and the folder it was imported from (the carried wheels come first on
PYTHONPATH), torchao and triton if present (looked up, never imported: a torchao built for another
torch may not import, and peft would import it too), the GPU. Exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from suite_rows import RowLog  # noqa: E402 (the bench folder on the path first)

#: (module, distribution) of every library the suite imports, in import order.
LIBRARIES = (
    ("numpy", "numpy"),
    ("PIL", "pillow"),
    ("safetensors", "safetensors"),
    ("tokenizers", "tokenizers"),
    ("huggingface_hub", "huggingface-hub"),
    ("transformers", "transformers"),
    ("accelerate", "accelerate"),
    ("diffusers", "diffusers"),
    ("peft", "peft"),
    ("pydantic_core", "pydantic-core"),
    ("pydantic", "pydantic"),
    ("pydantic_settings", "pydantic-settings"),
)
#: The project's modules every section imports, least first (the sections' own imports, the full-size
#: architectures among them, cost seconds more and fail there just as clearly).
PROJECT = ("api_schemas.jobs", "models.memory", "models.speed", "models.engine")


def origin(module: object) -> str:
    """The folder a module was imported from (`/tmp/site`, a venv's site-packages, ...)."""
    path = Path(getattr(module, "__file__", None) or "?")
    return str(path.parent.parent if path.name == "__init__.py" else path.parent)


def looked_up(distribution: str, path: list[str] | None = None) -> dict[str, str] | None:
    """A distribution's version and folder without importing it (None: not installed there)."""
    found = next(iter(importlib.metadata.distributions(name=distribution, path=path or sys.path)), None)
    if found is None:
        return None
    return {"version": found.version, "from": str(Path(str(found.locate_file(""))))}


def smoke(full: bool, fp8_site: Path | None, found: dict[str, Any]) -> None:
    """Fill `found` step by step (what a failure leaves in it is recorded too)."""
    started = time.perf_counter()

    def step(what: str) -> None:
        print(f"   [{time.perf_counter() - started:4.1f}s] {what}", flush=True)

    found["python"] = sys.version.split()[0]
    step("import torch")
    import torch

    found["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "from": origin(torch)}
    for module_name, distribution in LIBRARIES:
        step(f"import {module_name}")
        module = importlib.import_module(module_name)
        version = getattr(module, "__version__", None) or importlib.metadata.version(distribution)
        found[distribution] = {"version": str(version), "from": origin(module)}
    found["torchao"] = looked_up("torchao")
    found["triton"] = looked_up("triton")
    if fp8_site is not None:
        found["torchao (fp8 site)"] = looked_up("torchao", [str(fp8_site)])
    for module_name in PROJECT:
        step(f"import {module_name}")
        importlib.import_module(module_name)
    if full:
        step("CUDA")
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device (torch.cuda.is_available() is False)")
        properties = torch.cuda.get_device_properties(0)
        torch.ones(8, device="cuda").add_(1).sum().item()  # the driver really runs a kernel
        found["gpu"] = {
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "total_bytes": properties.total_memory,
            "count": torch.cuda.device_count(),
        }
    else:
        found["gpu"] = None
    step("done")


def describe(found: dict[str, Any]) -> str:
    lines = []
    for name, value in found.items():
        if isinstance(value, dict) and "version" in value:
            extra = f" (CUDA {value['cuda']})" if value.get("cuda") else ""
            lines.append(f"   {name:<22} {value['version']}{extra}  {value['from']}")
        elif name == "gpu" and isinstance(value, dict):
            lines.append(f"   {'gpu':<22} {value['name']} (sm {value['capability']}, "
                         f"{value['total_bytes'] / 2**30:.1f} GiB) x{value['count']}")  # fmt: skip
        elif name not in ("error", "seconds"):
            lines.append(f"   {name:<22} {value if value is not None else 'absent'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=["full", "tiny"], default="full")
    parser.add_argument("--out", type=Path, required=True, help="the suite's JSON results file")
    parser.add_argument("--fp8-site", type=Path, help="the folder the fp8 step's torchao is installed to")
    args = parser.parse_args()
    found: dict[str, Any] = {}
    started = time.perf_counter()
    failed = None
    try:
        smoke(args.shapes == "full", args.fp8_site, found)
    except BaseException as exc:  # noqa: BLE001 (an import can raise anything; it is the finding)
        traceback.print_exc()
        failed = f"{type(exc).__name__}: {exc}"
        found["error"] = failed
    found["seconds"] = round(time.perf_counter() - started, 2)
    RowLog(args.out).append("smoke", "versions", found)
    print(describe(found), flush=True)
    if failed:
        print(f"smoke: FAILED: {failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's teardown (torch's takes seconds): everything is written

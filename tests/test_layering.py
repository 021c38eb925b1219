"""What each package may import: the layering the README's Layout section states, checked."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ML = {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "torchvision", "models"}
WEB_AND_QUEUE = {"fastapi", "starlette", "uvicorn", "sse_starlette", "celery", "kombu", "app", "workers"}
DEV_TOOLING = {"app.stack", "app.demo"}


def imported(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (lazy imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def roots(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("path", package_files("models"), ids=lambda p: str(p.relative_to(ROOT)))
def test_models_never_import_the_web_or_the_queue(path: Path):
    assert not roots(imported(path)) & WEB_AND_QUEUE


@pytest.mark.parametrize("path", package_files("app"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_gateway_never_imports_the_model_stack(path: Path):
    assert not roots(imported(path)) & ML


@pytest.mark.parametrize("path", package_files("api_schemas"), ids=lambda p: str(p.relative_to(ROOT)))
def test_contracts_import_only_contracts(path: Path):
    assert not roots(imported(path)) & (ML | WEB_AND_QUEUE)


@pytest.mark.parametrize(
    "path",
    [p for pkg in ("app", "workers", "models", "api_schemas") for p in package_files(pkg)
     if p.name not in ("stack.py", "demo.py")],
    ids=lambda p: str(p.relative_to(ROOT)),
)  # fmt: skip
def test_production_code_never_imports_the_dev_tooling(path: Path):
    assert not imported(path) & DEV_TOOLING


def test_the_running_gateway_loads_no_torch():
    # The import graph as Python resolves it, transitive imports included.
    code = (
        "import sys; from app.main import create_app; from app.settings import GatewaySettings; "
        "import workers.webhooks, workers.tasks; create_app(GatewaySettings()); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'models') if m in sys.modules))"
    )
    env = {**os.environ, "DREAMOMNI2_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("dockerfile", ["gateway", "worker"])
def test_the_images_leave_the_dev_tooling_out(dockerfile: str):
    ignored = (ROOT / "docker" / f"{dockerfile}.Dockerfile.dockerignore").read_text().splitlines()
    assert "app/stack.py" in ignored and "app/demo.py" in ignored

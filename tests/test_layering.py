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
#: What the client package may import besides the standard library: the contracts, itself, and the
#: client's own dependencies (the HTTP client, the models, images, the progress bar, webhook checks).
CLIENT_IMPORTS = {"api_schemas", "dreamomni2", "httpx", "pydantic", "PIL", "tqdm", "standardwebhooks"}


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


@pytest.mark.parametrize("path", package_files("dreamomni2"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_client_imports_only_the_contracts_and_its_own_libraries(path: Path):
    outside = roots(imported(path)) - set(sys.stdlib_module_names) - CLIENT_IMPORTS
    assert not outside, f"{path.name} imports {sorted(outside)}"


@pytest.mark.parametrize(
    "path",
    [p for pkg in ("app", "workers", "models", "api_schemas", "dreamomni2") for p in package_files(pkg)
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


def test_the_client_runs_where_the_server_cannot_be_imported():
    # A client's machine has none of the server's packages: block them all, then import the client
    # and its command line, build both clients and run a command (against a closed port).
    blocked = sorted(ML | WEB_AND_QUEUE | {"redis"})
    code = f"""
import sys

BLOCKED = set({blocked!r})


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked")


sys.meta_path.insert(0, Block())
import dreamomni2
import dreamomni2.cli
import dreamomni2.cli_common
from dreamomni2 import AsyncClient, Client

Client("http://127.0.0.1:1").close()
AsyncClient("http://127.0.0.1:1")
exit_code = dreamomni2.cli.main(["--server", "http://127.0.0.1:1", "status", "j_0"])
assert exit_code == dreamomni2.cli_common.EXIT_UNAVAILABLE, exit_code
print(sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
    assert "unreachable" in result.stderr

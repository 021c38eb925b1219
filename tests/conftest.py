"""Session-wide fixtures: the tiny model set, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DREAMOMNI2_CACHE_DIR holding the tiny preset (built on first use)."""
    from models.tiny import ensure_tiny

    cache = tmp_path_factory.mktemp("cache")
    ensure_tiny(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_root(tiny_cache: Path) -> Path:
    """The tiny preset's folder: kontext/, edit_lora/, gen_lora/, vlm-model/."""
    from models.tiny import ensure_tiny

    return ensure_tiny(tiny_cache)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server of our own on a free loopback port, for the session."""
    from app.stack import LocalStack

    stack = LocalStack(tmp_path_factory.mktemp("redis"), workers=0)
    stack.start_redis()
    yield stack.redis_url
    stack.stop()


@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Registered LoRAs for the tiny transformer (`DREAMOMNI2_LORAS` entries), one per layout and rank:
    `style` (peft keys, rank 4, edits and generations), `kohya` (kohya's layout, rank 8, default scale
    0.5, edits only) and `comfy` (ComfyUI's layout, rank 2, feature_mixing too)."""
    from models.tiny_loras import save_tiny_lora

    folder = tmp_path_factory.mktemp("loras")
    return {
        "style": {"path": str(save_tiny_lora(folder / "style.safetensors", "peft", seed=1, rank=4))},
        "kohya": {
            "path": str(save_tiny_lora(folder / "kohya.safetensors", "kohya", seed=2, rank=8, alpha=16.0)),
            "scale": 0.5,
            "tasks": ["edit"],
        },
        "comfy": {
            "path": str(save_tiny_lora(folder / "comfy" / "comfy.safetensors", "comfyui", seed=3, rank=2)),
            "tasks": ["edit", "generate", "feature_mixing"],
        },
    }

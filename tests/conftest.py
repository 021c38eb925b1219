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

"""The main stack every API test shares: Redis, one worker and the gateway with two API keys.

Tests that need other settings (short leases, a job timeout, no worker, no Redis) start their own
smaller stack; a second gateway with other limits can join the main stack's Redis.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from app.auth import hash_key, new_key
from app.stack import LocalStack, ManagedProcess, free_port
from workers.store import JobStore, Store

from .support import (
    WEBHOOK_BACKOFF_S,
    check_alive,
    core_processes,
    new_webhook_secret,
    stack_env,
    wait_until,
)


@dataclass
class Service:
    """The running main stack and what tests use to talk to it."""

    stack: LocalStack
    keys: dict[str, str]
    redis: redis.Redis
    store: JobStore
    webhook_secrets: dict[str, str] = field(default_factory=dict)
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def core(self) -> list[ManagedProcess]:
        return core_processes(self.stack)

    def webhook_secret(self, owner: str) -> str:
        """The secret the main stack signs `owner`'s webhooks with (its own, else the deployment's)."""
        return self.webhook_secrets.get(owner, self.webhook_secrets["*"])

    def client(self, owner: str | None = "alice", base_url: str | None = None) -> httpx.Client:
        """An HTTP client sending `owner`'s key (none for None), closed after the test."""
        headers = {"Authorization": f"Bearer {self.keys[owner]}"} if owner else {}
        client = httpx.Client(base_url=base_url or self.stack.url, headers=headers, timeout=60)
        self.clients.append(client)
        return client

    def idle(self) -> bool:
        """No job queued or running (what a test leaves behind for the next)."""
        return self.store.queue_depth() == 0 and not self.redis.scard("do2:running")


@pytest.fixture(scope="session")
def api_keys() -> dict[str, str]:
    return {"alice": new_key(), "bob": new_key()}


@pytest.fixture(scope="session")
def webhook_secrets() -> dict[str, str]:
    """The main stack's webhook secrets: the deployment's ("*") and alice's own."""
    return {"*": new_webhook_secret(), "alice": new_webhook_secret()}


@pytest.fixture(scope="session")
def result_url_secret() -> str:
    """The key the main stack signs result links with (required with API keys on)."""
    return secrets.token_urlsafe(32)


@pytest.fixture(scope="session")
def main_stack(
    tiny_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
    api_keys: dict[str, str],
    webhook_secrets: dict[str, str],
    result_url_secret: str,
    tiny_loras: dict[str, dict],
) -> Iterator[LocalStack]:
    entries = ",".join(f"{name}:{hash_key(key)}" for name, key in api_keys.items())
    port = free_port()
    env = stack_env(
        tiny_cache,
        DREAMOMNI2_API_KEYS=entries,
        # Signed result links, with the gateway's address as their base, also in the workers' webhooks.
        DREAMOMNI2_RESULT_URL_SECRET=result_url_secret,
        DREAMOMNI2_PUBLIC_URL=f"http://127.0.0.1:{port}",
        # Webhooks on, to receivers on loopback (refused anywhere else), retried quickly.
        DREAMOMNI2_WEBHOOK_SECRET=webhook_secrets["*"],
        DREAMOMNI2_WEBHOOK_SECRETS=f"alice:{webhook_secrets['alice']}",
        DREAMOMNI2_WEBHOOK_ALLOWLIST="127.0.0.1",
        DREAMOMNI2_WEBHOOK_BACKOFF_S=str(WEBHOOK_BACKOFF_S),
        # Registered LoRAs (gateway and worker): `style`, `kohya` (edits only), `comfy`.
        DREAMOMNI2_LORAS=json.dumps(tiny_loras),
    )
    with LocalStack(tmp_path_factory.mktemp("main-stack"), port=port, workers=1, env=env) as stack:
        yield stack


@pytest.fixture
def service(
    main_stack: LocalStack, api_keys: dict[str, str], webhook_secrets: dict[str, str]
) -> Iterator[Service]:
    """The main stack; after the test, waits until its worker is idle so tests do not overlap."""
    check_alive(core_processes(main_stack))
    client = redis.Redis.from_url(main_stack.redis_url)
    running = Service(main_stack, api_keys, client, Store.connect(client).jobs, webhook_secrets)
    yield running
    for http in running.clients:
        http.close()
    check_alive(running.core)
    wait_until(
        lambda: True if running.idle() else None,
        timeout=60,
        what="the main stack's queue to drain",
        watch=running.core,
    )
    client.close()


@pytest.fixture
def alice(service: Service) -> httpx.Client:
    return service.client("alice")


@pytest.fixture
def bob(service: Service) -> httpx.Client:
    return service.client("bob")


@pytest.fixture(scope="session")
def lax_gateway(main_stack: LocalStack) -> Iterator[str]:
    """The URL of a second gateway on the main stack's Redis that admits images as small as 1 pixel
    a side, which the workers refuse (their smallest side is 16): a job with such an image passes
    the gateway and fails in the worker (`image_too_small`), as a job that fails at run time does."""
    port = free_port()
    gateway = main_stack.start_gateway(port=port, env={"DREAMOMNI2_MIN_IMAGE_SIDE": "1"})
    yield f"http://127.0.0.1:{port}"
    gateway.stop()

"""The gateway in process: `create_app` behind `httpx.ASGITransport`, on a real Redis, no worker.

Fast enough to test every parsing rule and error mapping one by one; the real-stack suite
(`tests/integration`) keeps the end-to-end behaviours.
"""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import PIL.Image
import pytest
from fastapi import FastAPI

from app.auth import hash_key
from app.main import create_app
from app.service import JobService
from app.settings import GatewaySettings

KEYS = {"alice": "do2_alice_key", "bob": "do2_bob_key"}
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
#: The key of signed result links (required with API keys on).
LINK_SECRET = "links-" + "q8VZ0bTnX3kR7yW2mC5pL9sD4fH6jA1e"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def png(width: int = 32, height: int = 32, color: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def form(fields: dict[str, str], files: list[tuple[str, bytes]] | None = None) -> dict:
    """Keyword arguments of an httpx request sending `fields` (and `files`) as multipart/form-data,
    also when there is no file (httpx would send a urlencoded form)."""
    boundary = "do2boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    for n, (name, data) in enumerate(files or []):
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{n}.png"\r\n'
        parts.append(head.encode() + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return {"content": body, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


@dataclass
class Gateway:
    app: FastAPI
    client: Callable[[str | None], httpx.AsyncClient]

    @property
    def service(self) -> JobService:
        return self.app.state.jobs


def settings_for(redis_url: str, **overrides: object) -> GatewaySettings:
    entries = ",".join(f"{name}:{hash_key(key)}" for name, key in KEYS.items())
    values: dict[str, object] = {
        "redis_url": redis_url,
        "redis_prefix": f"app{uuid.uuid4().hex[:8]}",
        "api_keys": entries,
        "webhook_secret": SECRET,
        "result_url_secret": LINK_SECRET,
        "max_wait_s": 5,
        "deadline_sweep_s": 0.2,
    }
    values.update(overrides)
    return GatewaySettings(**values)


@pytest.fixture
async def gateway(redis_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    """The app with its lifespan running; `gateway.client("alice")` sends alice's key (None: no key)."""
    marker = request.node.get_closest_marker("settings")
    app = create_app(settings_for(redis_url, **(marker.kwargs if marker else {})))
    clients: list[httpx.AsyncClient] = []

    def client(owner: str | None = "alice") -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {KEYS[owner]}"} if owner else {}
        made = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway.test", headers=headers
        )
        clients.append(made)
        return made

    async with app.router.lifespan_context(app):
        yield Gateway(app, client)
        for made in clients:
            await made.aclose()

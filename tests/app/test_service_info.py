"""`GET /v1/service` (the limits a client reads before it submits) and the web page's files at `/`."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from api_schemas.api import ServiceInfo
from app.routes import STATIC_DIR
from tests.app.conftest import Gateway

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.settings(
    limits={
        "max_images": 3,
        "max_instruction_chars": 500,
        "max_steps": 64,
        "default_steps": 20,
        "step_caches": "taylorseer",
        "step_cache": "taylorseer",
    },
    max_request_bytes=12345678,
)
async def test_the_service_describes_its_limits_without_a_key(gateway: Gateway):
    response = await gateway.client(None).get("/v1/service")
    assert response.status_code == 200, response.text
    info = ServiceInfo.model_validate(response.json())
    assert info.auth_required is True
    assert (info.max_images, info.max_instruction_chars) == (3, 500)
    assert (info.min_steps, info.max_steps, info.default_steps) == (1, 64, 20)
    assert (info.min_guidance, info.max_guidance, info.default_guidance) == (0.0, 30.0, 3.5)
    assert (info.min_size, info.max_size, info.default_size, info.max_aspect_ratio) == (64, 4096, 1024, 4.0)
    assert info.max_request_bytes == 12345678
    assert [f.value for f in info.output_formats] == ["png", "jpeg", "webp"]
    assert [c.value for c in info.step_caches] == ["none", "taylorseer"]
    assert info.default_step_cache.value == "taylorseer"
    # Nothing of the keys or the webhook secrets, in any form.
    body = response.text
    for secret in ("sha", "whsec", "do2_", "key"):
        assert secret not in body.replace("auth_required", "").lower()


@pytest.mark.settings(auth="off", api_keys="", limits={"step_caches": ""})
async def test_without_keys_or_caches(gateway: Gateway):
    info = (await gateway.client(None).get("/v1/service")).json()
    assert info["auth_required"] is False
    assert info["step_caches"] == ["none"]


async def test_the_endpoint_is_documented_and_public(gateway: Gateway):
    document = (await gateway.client(None).get("/openapi.json")).json()
    operation = document["paths"]["/v1/service"]["get"]
    assert operation["operationId"] == "get_service_info"
    assert "security" not in operation
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ServiceInfo"}
    assert set(document["components"]["schemas"]["ServiceInfo"]["required"]) == set(ServiceInfo.model_fields)
    assert "/" not in document["paths"], "the page is not part of the API"


async def test_the_page_and_its_files(gateway: Gateway):
    client = gateway.client(None)
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    # Only this origin's script, style and API; no framing.
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    referenced = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
    scripts = [
        "static/api.js",
        "static/app.js",
        "static/history.js",
        "static/images.js",
        "static/job.js",
        "static/loras.js",
        "static/results.js",
        "static/shared.js",
    ]
    assert sorted(referenced) == sorted(["static/app.css", *scripts])
    types = {"static/app.css": "text/css", **dict.fromkeys(scripts, "text/javascript")}
    for path in referenced:
        asset = await client.get(f"/{path}")
        assert asset.status_code == 200, path
        assert asset.headers["content-type"].split(";")[0] in (types[path], "application/javascript")
    missing = await client.get("/static/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_nothing_is_fetched_from_elsewhere():
    # The page must work offline and behind strict egress rules: no CDN, no external font or script.
    for path in STATIC_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://", text), f"{path.name} refers to another origin"
        assert "@import" not in text and "import(" not in text, path.name


def test_the_page_ships_in_the_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["app"]
    for path in STATIC_DIR.iterdir():
        name = path.relative_to(STATIC_DIR.parent).as_posix()
        assert any(fnmatch(name, pattern) for pattern in patterns), f"{name} is not package data"

"""What a browser needs from the API: offline docs, CORS for allowed origins only."""

from __future__ import annotations

import re

import pytest

from tests.app.conftest import Gateway

pytestmark = pytest.mark.anyio


async def test_the_docs_load_everything_from_the_gateway(gateway: Gateway):
    client = gateway.client(None)
    page = await client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert urls and all(url.startswith("/") for url in urls), urls  # no CDN: it works offline
    for url in urls:
        asset = await client.get(url)
        assert asset.status_code == 200 and asset.content, url
    assert (await client.get("/redoc")).status_code == 404  # ReDoc would need a CDN: not served


async def test_cors_is_off_by_default(gateway: Gateway):
    response = await gateway.client(None).options(
        "/v1/jobs", headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.settings(cors_origins="https://app.example.com, http://localhost:3000")
async def test_cors_admits_the_listed_origins_only(gateway: Gateway):
    client = gateway.client(None)
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = await client.options("/v1/jobs", headers={"Origin": "https://app.example.com", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    refused = await client.options("/v1/jobs", headers={"Origin": "https://evil.example", **preflight})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    assert refused.json()["error"]["code"] == "cors_refused"
    assert "https://evil.example" in refused.json()["error"]["message"]
    job = await gateway.client().post(
        "/v1/jobs", json={"instruction": "a cat"}, headers={"Origin": "http://localhost:3000"}
    )
    assert job.status_code == 202 and job.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "location" in job.headers["access-control-expose-headers"].lower()


def test_a_cors_origin_with_a_path_is_refused():
    from pydantic import ValidationError

    from app.settings import GatewaySettings

    with pytest.raises(ValidationError, match="not an origin"):
        GatewaySettings(cors_origins="https://app.example.com/page")

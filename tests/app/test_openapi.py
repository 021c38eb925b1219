"""The OpenAPI document: the bearer scheme, both submit encodings, the headers, the error envelope."""

from __future__ import annotations

import pytest

from tests.app.conftest import Gateway

pytestmark = pytest.mark.anyio


async def test_the_document_describes_the_api(gateway: Gateway):
    document = (await gateway.client(None).get("/openapi.json")).json()
    assert document["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["HTTPBearer"]["description"],
    }
    create = document["paths"]["/v1/jobs"]["post"]
    assert create["security"] == [{"HTTPBearer": []}]
    content = create["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/JobRequestJSON"}
    assert "JobRequestJSON" in document["components"]["schemas"]
    headers = {p["name"] for p in create["parameters"] if p["in"] == "header"}
    assert headers == {"prefer", "idempotency-key", "cancel-after"}
    events = document["paths"]["/v1/jobs/{job_id}/events"]["get"]
    assert {p["name"] for p in events["parameters"] if p["in"] == "header"} == {"last-event-id"}
    for status in ("401", "404", "409", "413", "422"):
        schema = create["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}
    assert "security" not in document["paths"]["/healthz"]["get"]

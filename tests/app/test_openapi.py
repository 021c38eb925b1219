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


async def test_binary_and_stream_answers_are_not_declared_json(gateway: Gateway):
    # A generated client decodes a declared application/json body as text: an image would break it.
    paths = (await gateway.client(None).get("/openapi.json")).json()["paths"]
    result = paths["/v1/jobs/{job_id}/result"]["get"]["responses"]["200"]["content"]
    assert set(result) == {"image/png", "image/jpeg", "image/webp"}
    events = paths["/v1/jobs/{job_id}/events"]["get"]["responses"]
    assert set(events["200"]["content"]) == {"text/event-stream"} and "204" in events


@pytest.mark.settings(limits={"max_steps": 77})
async def test_both_body_encodings_are_typed_with_the_deployments_ranges(gateway: Gateway):
    document = (await gateway.client(None).get("/openapi.json")).json()
    content = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    form = content["multipart/form-data"]["schema"]["properties"]
    body = document["components"]["schemas"]["JobRequestJSON"]["properties"]

    def typed(field: dict, kind: str) -> dict:
        # JSON: `anyOf [T, null]`; multipart: T itself (a part cannot be null, only left out).
        return next(v for v in field.get("anyOf", [field]) if v.get("type") == kind)

    for fields in (form, body):
        steps = typed(fields["steps"], "integer")
        assert (steps["minimum"], steps["maximum"]) == (1, 77)
        assert typed(fields["guidance"], "number")["maximum"] == 30
        assert typed(fields["seed"], "integer")["maximum"] == 2**53 - 1
        assert fields["translate"]["type"] == "boolean"
    assert all("null" not in str(field) for field in form.values())
    # DREAMOMNI2_MAX_IMAGES (5), and one more for a judge (the inputs, then the output).
    assert form["images"]["maxItems"] == 6 and form["images"]["items"]["format"] == "binary"
    for fields in (form, body):
        count = typed(fields["count"], "integer")
        assert (count["minimum"], count["maximum"]) == (1, 8)


async def test_the_documented_example_is_accepted(gateway: Gateway):
    document = (await gateway.client(None).get("/openapi.json")).json()
    example = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["example"]
    response = await gateway.client().post("/v1/jobs", json=example)
    assert response.status_code == 202, response.text
    assert response.json()["image_count"] == 2

"""API keys: no key or an unknown key is 401; one key never sees another key's jobs."""

from __future__ import annotations

import httpx
import pytest

from .conftest import Service
from .support import StoreSnapshot, assert_error, example_images, submit_json, submit_multipart


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "missing_api_key"),
        ("Bearer", "missing_api_key"),
        ("Basic YWxpY2U6c2VjcmV0", "missing_api_key"),
        ("Bearer do2_not-a-key-anyone-was-given", "invalid_api_key"),
    ],
)
def test_submit_without_a_valid_key_is_401_and_queues_nothing(
    service: Service, authorization: str | None, code: str
) -> None:
    client = service.client(owner=None)
    headers = {"Authorization": authorization} if authorization else {}
    before = StoreSnapshot.take(service.redis)

    response = submit_multipart(client, example_images(1), {"instruction": "Make it blue"}, headers=headers)

    assert_error(response, 401, code)
    assert response.headers["www-authenticate"] == "Bearer"
    before.assert_unchanged(service.redis)


def test_key_is_checked_before_the_body(service: Service) -> None:
    """An unauthenticated caller learns nothing about its request, not even that it is invalid."""
    client = service.client(owner=None)

    response = client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})

    assert_error(response, 401, "missing_api_key")


def test_reads_need_a_key(service: Service, alice: httpx.Client) -> None:
    job = submit_json(alice, [], {"instruction": "A cat", "steps": 2}, headers={"Prefer": "wait=30"}).json()
    anonymous = service.client(owner=None)

    for path in (job["links"]["self"], job["links"]["result"]):
        response = anonymous.get(path)
        assert_error(response, 401, "missing_api_key")
        assert response.headers["www-authenticate"] == "Bearer"


def test_keys_only_see_their_own_jobs(service: Service, alice: httpx.Client, bob: httpx.Client) -> None:
    response = submit_json(alice, [], {"instruction": "A cat", "steps": 2}, headers={"Prefer": "wait=30"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded"

    for path in (job["links"]["self"], job["links"]["result"]):
        assert alice.get(path).status_code == 200
        not_yours = assert_error(bob.get(path), 404, "job_not_found")
        # The same answer as for an id that never existed: bob cannot even tell the job exists.
        missing = assert_error(bob.get(path.replace(job["id"], "j_" + "0" * 32)), 404, "job_not_found")
        assert not_yours["message"].replace(job["id"], "ID") == missing["message"].replace(
            "j_" + "0" * 32, "ID"
        )

    mine = submit_json(bob, [], {"instruction": "A dog", "steps": 2}, headers={"Prefer": "wait=30"}).json()
    assert mine["status"] == "succeeded"
    assert_error(alice.get(mine["links"]["self"]), 404, "job_not_found")
    assert bob.get(mine["links"]["result"]).status_code == 200


def test_unknown_job_ids_are_404(service: Service, alice: httpx.Client) -> None:
    for job_id in ("j_" + "f" * 32, "not-a-job-id", "do2:queue"):
        assert_error(alice.get(f"/v1/jobs/{job_id}"), 404, "job_not_found")
        assert_error(alice.get(f"/v1/jobs/{job_id}/result"), 404, "job_not_found")


def test_operational_endpoints_need_no_key_but_metrics_do(service: Service) -> None:
    client = service.client(owner=None)

    for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/v1/service"):
        assert client.get(path).status_code == 200, path
    # The numbers describe every key's traffic: with keys on, a scraper sends one.
    assert_error(client.get("/metrics"), 401, "missing_api_key")
    assert service.client("bob").get("/metrics").status_code == 200

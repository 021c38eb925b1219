"""Signed result links on the real stack (API keys on): the link in the job object and the one the GPU
worker put in the webhook download without a key; a tampered link is 403, an expired one 410."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from dreamomni2 import AsyncClient, Client, Job, NotFoundError
from workers.result_links import ResultLinkSigner

from .conftest import Service
from .support import WebhookReceiver, assert_error, submit_json


def test_a_finished_jobs_links_download_without_a_key(
    service: Service, alice: httpx.Client, result_url_secret: str
) -> None:
    with WebhookReceiver() as receiver:
        hook = receiver.endpoint(service.webhook_secret("alice"))
        fields = {"instruction": "A cat", "steps": 2, "webhook_url": hook}
        response = submit_json(alice, [], fields, headers={"Prefer": "wait=30"})
        assert response.status_code == 200, response.text
        job = response.json()
        [delivery] = receiver.wait_for(
            hook, lambda got: len(got) >= 1, what="the completed webhook", watch=service.core
        )
    assert delivery.verified and job["status"] == "succeeded"
    link = job["result"]["signed_url"]
    assert link.startswith(f"{service.stack.url}/v1/results/{job['id']}?index=0&expires=")
    image = alice.get(job["result"]["url"]).content
    anonymous = service.client(owner=None)  # no Authorization header at all, as an <img> tag

    downloaded = anonymous.get(link)
    assert downloaded.status_code == 200, downloaded.text
    assert downloaded.content == image and downloaded.headers["content-type"] == "image/png"
    # The worker signed the webhook's link with the same key, at DREAMOMNI2_PUBLIC_URL.
    hooked = delivery.payload["result"]["signed_url"]
    assert hooked.startswith(f"{service.stack.url}/v1/results/{job['id']}?")
    assert anonymous.get(hooked).content == image

    tampered = link.replace("index=0", "index=1")
    assert_error(anonymous.get(tampered), 403, "link_invalid")
    forged = link[:-4] + ("AAAA" if not link.endswith("AAAA") else "BBBB")
    assert_error(anonymous.get(forged), 403, "link_invalid")
    # A link the service issued (its key) an hour and more ago, now past its expiry.
    signer = ResultLinkSigner(result_url_secret.encode(), ttl_s=60)
    expired = signer.link(service.stack.url, job["id"], 0, now=time.time() - 3600)
    error = assert_error(anonymous.get(expired.url), 410, "link_expired")
    assert error["details"]["expired_at"] == expired.expires_at.isoformat()


def test_the_client_hands_out_the_signed_link(service: Service, alice: httpx.Client) -> None:
    response = submit_json(alice, [], {"instruction": "A dog", "steps": 2}, headers={"Prefer": "wait=30"})
    assert response.status_code == 200, response.text
    job = Job.model_validate(response.json())
    anonymous = service.client(owner=None)
    with Client(service.stack.url, api_key=service.keys["alice"]) as client:
        assert client.result_url(job) == job.result.signed_url  # the object's own link, still fresh
        by_id = client.result_url(job.id)
        # An object whose link ends too soon for the caller is read again: a link as fresh as it gets.
        fresh = client.result_url(job, min_valid_s=10**9)
        with pytest.raises(NotFoundError) as missing:
            client.result_url(job, index=1)
    assert missing.value.code == "result_index"
    for url in (by_id, fresh):
        assert anonymous.get(url).content == alice.get(job.result.url).content

    async def from_async() -> str:
        async with AsyncClient(service.stack.url, api_key=service.keys["alice"]) as client:
            return await client.result_url(job.id)

    assert anonymous.get(asyncio.run(from_async())).status_code == 200

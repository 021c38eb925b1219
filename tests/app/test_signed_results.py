"""Signed result links through the gateway: every result has one, it downloads without a key, and a
forged, altered, expired or malformed one is refused in the envelope, never with a 5xx."""

from __future__ import annotations

import json
import time
import uuid
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from pydantic import ValidationError

from api_schemas.api import JobStatus
from api_schemas.common import WebhookEvent
from api_schemas.records import StoredResult
from app.settings import GatewaySettings
from tests.app.conftest import LINK_SECRET, Gateway, png, settings_for
from workers.config import ServiceSettings
from workers.result_links import ResultLinkSigner
from workers.webhooks import Notifier

pytestmark = pytest.mark.anyio


async def finished_job(gateway: Gateway, owner: str = "alice", images: int = 1, **fields: object) -> dict:
    """A job of `owner` that a worker finished with `images` result images (the store's own calls)."""
    job = (await gateway.client(owner).post("/v1/jobs", json={"instruction": "a cat", **fields})).json()
    jobs = gateway.service.store.jobs
    claim = jobs.claim(job["id"], worker="w", lease_ttl_s=5)
    data = [png(16 + 8 * n, 16) for n in range(images)]
    results = [(StoredResult(width=16 + 8 * n, height=16, content_type="image/png", bytes=len(d)), d)
               for n, d in enumerate(data)]  # fmt: skip
    assert jobs.finish(job["id"], claim.token, JobStatus.SUCCEEDED, ttl_s=60, results=results)
    finished = (await gateway.client(owner).get(f"/v1/jobs/{job['id']}")).json()
    assert finished["status"] == "succeeded"
    return finished


def with_query(url: str, **changes: object) -> str:
    """`url` with query parameters replaced (None: removed)."""
    split = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(split.query).items()}
    query.update({name: str(value) for name, value in changes.items() if value is not None})
    for name in [name for name, value in changes.items() if value is None]:
        query.pop(name, None)
    return split._replace(query=urlencode(query)).geturl()


def assert_refused(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


async def test_every_result_has_a_signed_link_that_needs_no_key(gateway: Gateway):
    job = await finished_job(gateway)
    result = job["result"]
    assert result["url"] == f"/v1/jobs/{job['id']}/result"
    assert result["signed_url"].startswith(f"http://gateway.test/v1/results/{job['id']}?index=0&expires=")
    expires = int(parse_qs(urlsplit(result["signed_url"]).query)["expires"][0])
    ttl = GatewaySettings.model_fields["result_url_ttl_s"].default
    assert time.time() + ttl < expires <= time.time() + ttl + 300
    assert result["signed_url_expires_at"].startswith(time.strftime("%Y-%m-%d", time.gmtime(expires)))
    assert job["results"] == [result]

    anonymous = gateway.client(None)  # no Authorization header, as an <img> tag sends
    image = await anonymous.get(result["signed_url"])
    assert image.status_code == 200, image.text
    assert image.headers["content-type"] == "image/png" and len(image.content) == result["bytes"]
    assert image.content == (await gateway.client().get(result["url"])).content
    assert image.headers["cache-control"].startswith("private, max-age=")
    assert image.headers["cross-origin-resource-policy"] == "cross-origin"
    head = await anonymous.head(result["signed_url"])
    assert head.status_code == 200 and head.content == b""
    # Read again within the rounding step: the same link (pages and caches can keep it).
    again = (await gateway.client().get(f"/v1/jobs/{job['id']}")).json()
    assert again["result"]["signed_url"] == result["signed_url"]


async def test_each_image_of_a_pair_has_its_own_link(gateway: Gateway):
    job = await finished_job(gateway, images=2)
    source, target = job["results"]
    assert "index=0" in source["signed_url"] and "index=1" in target["signed_url"]
    anonymous = gateway.client(None)
    for result in (source, target):
        response = await anonymous.get(result["signed_url"])
        assert response.status_code == 200 and len(response.content) == result["bytes"]
    # The signature of image 0 does not open image 1.
    swapped = with_query(source["signed_url"], index=1)
    assert_refused(await anonymous.get(swapped), 403, "link_invalid")


async def test_forged_and_altered_links_are_403_whether_or_not_the_job_exists(gateway: Gateway):
    alice_job = await finished_job(gateway, "alice")
    bob_job = await finished_job(gateway, "bob")
    link = alice_job["result"]["signed_url"]
    signature = parse_qs(urlsplit(link).query)["signature"][0]
    expires = int(parse_qs(urlsplit(link).query)["expires"][0])
    anonymous = gateway.client(None)
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    forged = [
        with_query(link, signature=flipped),
        with_query(link, signature=signature[:-2]),
        with_query(link, signature="x"),
        with_query(link, expires=expires + 86400),  # a longer life
        with_query(link, expires=expires - 1),
        with_query(link, index=1),  # an image the job does not have
        link.replace(alice_job["id"], bob_job["id"]),  # another key's job
        link.replace(alice_job["id"], "j_" + "0" * 32),  # no such job
        link.replace(alice_job["id"], "do2:queue"),
    ]
    messages = set()
    for url in forged:
        response = await anonymous.get(url)
        messages.add(assert_refused(response, 403, "link_invalid")["message"])
        assert "details" not in response.json()["error"]
    assert len(messages) == 1, "one answer for every forgery: nothing says whether the job exists"
    # The API key does not make a forged link work either; the real link still does.
    assert_refused(await gateway.client("alice").get(forged[0]), 403, "link_invalid")
    assert (await anonymous.get(link)).status_code == 200


async def test_an_expired_link_is_410_and_a_forged_expired_one_403(gateway: Gateway):
    job = await finished_job(gateway)
    signer = gateway.service.result_links
    issued_then = signer.link("http://gateway.test", job["id"], 0, now=time.time() - 2 * signer.ttl_s - 600)
    anonymous = gateway.client(None)
    error = assert_refused(await anonymous.get(issued_then.url), 410, "link_expired")
    assert error["details"]["expired_at"] == issued_then.expires_at.isoformat()
    # 410 only for links this service issued: one signed with another key is 403 all the same.
    stranger = ResultLinkSigner(b"another deployment's key, 32 bytes", 60)
    old = stranger.link("http://gateway.test", job["id"], 0, now=time.time() - 3600)
    assert_refused(await anonymous.get(old.url), 403, "link_invalid")
    # An expired link to a job that no longer exists is 410 too: the signature is what is checked.
    gone = signer.link("http://gateway.test", "j_" + "1" * 32, 0, now=time.time() - 2 * signer.ttl_s)
    assert_refused(await anonymous.get(gone.url), 410, "link_expired")


async def test_a_genuine_link_to_an_expired_result_is_404(gateway: Gateway):
    client = gateway.client()
    job = (await client.post("/v1/jobs", json={"instruction": "a cat"})).json()
    jobs = gateway.service.store.jobs
    claim = jobs.claim(job["id"], worker="w", lease_ttl_s=5)
    info = StoredResult(width=16, height=16, content_type="image/png", bytes=3)
    assert jobs.finish(job["id"], claim.token, JobStatus.SUCCEEDED, ttl_s=60, results=[(info, b"PNG")])
    link = (await client.get(f"/v1/jobs/{job['id']}")).json()["result"]["signed_url"]
    jobs.redis.delete(jobs.keys.result(job["id"], 0))  # the image's TTL ran out
    assert_refused(await gateway.client(None).get(link), 404, "result_expired")
    jobs.redis.delete(jobs.keys.job(job["id"]))  # and then the job's
    assert_refused(await gateway.client(None).get(link), 404, "job_not_found")


@pytest.mark.parametrize(
    "changes",
    [
        {"expires": "soon"},
        {"expires": "1.5"},
        {"expires": "-1"},
        {"expires": "9" * 40},  # huge
        {"expires": ""},
        {"expires": None},
        {"signature": None},
        {"signature": ""},
        {"signature": "A" * 500},
        {"index": "16"},  # past MAX_RESULTS
        {"index": "-1"},
        {"index": "one"},
    ],
    ids=lambda changes: ",".join(f"{k}={'<none>' if v is None else v[:8]}" for k, v in changes.items()),
)
async def test_malformed_links_are_422_in_the_envelope(gateway: Gateway, changes: dict):
    job = await finished_job(gateway)
    before = set(gateway.service.store.redis.scan_iter(match="*", count=1000))
    response = await gateway.client(None).get(with_query(job["result"]["signed_url"], **changes))
    error = assert_refused(response, 422, "invalid_request")
    assert error["details"]["errors"], error
    assert set(gateway.service.store.redis.scan_iter(match="*", count=1000)) == before, "nothing created"


async def test_job_ids_that_are_not_ids_are_403_not_500(gateway: Gateway):
    anonymous = gateway.client(None)
    query = "?index=0&expires=4000000000&signature=" + "A" * 43
    for job_id in ("%00", "j_" + "f" * 2000, "%F0%9F%90%88", "%ff", "%20", "a%3Fb"):
        assert_refused(await anonymous.get(f"/v1/results/{job_id}{query}"), 403, "link_invalid")
    # A path that is not one id is no route of ours at all.
    assert_refused(await anonymous.get(f"/v1/results/..%2F..%2Fjobs{query}"), 404, "not_found")


@pytest.mark.settings(public_url="https://images.example.com/dreamomni2/")
async def test_public_url_is_the_links_base(gateway: Gateway):
    job = await finished_job(gateway)
    link = job["result"]["signed_url"]
    assert link.startswith(f"https://images.example.com/dreamomni2/v1/results/{job['id']}?")
    # The gateway itself serves it at its own root (the proxy strips the prefix).
    split = urlsplit(link)
    response = await gateway.client(None).get(split.path.removeprefix("/dreamomni2") + "?" + split.query)
    assert response.status_code == 200


async def test_the_final_event_carries_the_signed_links(gateway: Gateway):
    job = await finished_job(gateway)
    async with gateway.client().stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        body = (await stream.aread()).decode()
    assert "event: succeeded" in body and job["result"]["signed_url"] in body


@pytest.mark.settings(webhook_allowlist="127.0.0.1")
async def test_webhooks_carry_signed_links_only_with_a_public_url(gateway: Gateway):
    job = await finished_job(gateway, webhook_url="http://127.0.0.1:9/hook")
    store = gateway.service.store
    queue = f"test-webhooks-{uuid.uuid4().hex[:8]}"  # the delivery's message goes nowhere it is consumed

    def webhook_body(public_url: str) -> dict:
        # What a GPU worker does when the job ends: its notifier stores the body and queues a message.
        settings = ServiceSettings(result_url_secret=LINK_SECRET, public_url=public_url, webhook_queue=queue)
        delivery = Notifier(store, gateway.service.celery, settings).notify(job["id"], WebhookEvent.COMPLETED)
        assert delivery is not None
        return json.loads(store.deliveries.get(delivery).body)

    try:
        hooked = webhook_body("https://api.example.com")
        plain = webhook_body("")
    finally:
        store.redis.delete(queue)
    link = hooked["result"]["signed_url"]
    assert link.startswith(f"https://api.example.com/v1/results/{job['id']}?index=0&expires=")
    # Signed by the worker-side notifier with the shared key: the gateway takes it.
    response = await gateway.client(None).get(link.removeprefix("https://api.example.com"))
    assert response.status_code == 200
    assert plain["result"]["signed_url"] is None and plain["result"]["url"] == job["result"]["url"]


def test_api_keys_without_a_link_secret_refuse_to_start(redis_url: str):
    with pytest.raises(ValidationError, match="DREAMOMNI2_RESULT_URL_SECRET is empty"):
        settings_for(redis_url, result_url_secret="")
    with pytest.raises(ValidationError, match="DREAMOMNI2_RESULT_URL_SECRET is empty"):
        GatewaySettings(auth="on", api_keys=f"a:{'0' * 64}")
    # Keys off: links are signed with a derived key (every result is public anyway).
    assert GatewaySettings(auth="off", api_keys="").result_url_secret.get_secret_value() == ""


@pytest.mark.settings(auth="off", api_keys="", result_url_secret="")
async def test_with_keys_off_links_work_without_a_secret(gateway: Gateway):
    assert not gateway.service.result_links.keyed
    job = await finished_job(gateway)
    response = await gateway.client(None).get(job["result"]["signed_url"])
    assert response.status_code == 200
    assert_refused(
        await gateway.client(None).get(with_query(job["result"]["signed_url"], index=1)), 403, "link_invalid"
    )


async def test_the_document_describes_the_signed_link_route(gateway: Gateway):
    document = (await gateway.client(None).get("/openapi.json")).json()
    operation = document["paths"]["/v1/results/{job_id}"]["get"]
    assert "security" not in operation, "no key: the signature is the credential"
    assert set(operation["responses"]["200"]["content"]) == {"image/png", "image/jpeg", "image/webp"}
    for status in ("403", "404", "410", "422"):
        schema = operation["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert {"job_id", "index", "expires", "signature"} == set(parameters)
    assert parameters["expires"]["required"] and parameters["signature"]["required"]
    assert not parameters["index"].get("required")
    result = document["components"]["schemas"]["ResultInfo"]["properties"]
    assert {"signed_url", "signed_url_expires_at"} <= set(result)

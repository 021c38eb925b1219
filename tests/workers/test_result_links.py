"""Signed result links: what is signed, tampering, expiry, the key, and the settings behind them."""

from __future__ import annotations

import hmac
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import ValidationError

from api_schemas.errors import LinkExpired, LinkInvalid
from workers.config import ServiceSettings
from workers.result_links import MAX_ROUNDING_S, ResultLinkSigner

KEY = b"k" * 32
NOW = 1_800_000_000.0
JOB = "j_5f2c8a0e6b7d4c1e9a3b2f10"


def parts(url: str) -> tuple[str, int, int, str]:
    """(job id, index, expires, signature) of a link, as the route reads them."""
    split = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(split.query).items()}
    return split.path.rsplit("/", 1)[1], int(query["index"]), int(query["expires"]), query["signature"]


def test_a_link_is_absolute_and_checks_until_it_expires():
    signer = ResultLinkSigner(KEY, ttl_s=3600)
    link = signer.link("https://dreamomni2.example.com/api/", JOB, 1, now=NOW)
    assert link.url.startswith(f"https://dreamomni2.example.com/api/v1/results/{JOB}?index=1&expires=")
    job_id, index, expires, signature = parts(link.url)
    assert (job_id, index, expires) == (JOB, 1, link.expires)
    assert NOW + 3600 < expires <= NOW + 3600 + 360  # the TTL, rounded up by at most a tenth of it
    assert link.expires_at.timestamp() == expires
    signer.check(job_id, index, expires, signature, now=NOW)
    signer.check(job_id, index, expires, signature, now=expires - 1)
    with pytest.raises(LinkExpired) as expired:
        signer.check(job_id, index, expires, signature, now=expires)
    assert expired.value.http_status == 410 and expired.value.details["expired_at"]


def test_changing_any_part_of_a_link_breaks_it():
    signer = ResultLinkSigner(KEY, ttl_s=3600)
    job_id, index, expires, signature = parts(signer.link("http://h", JOB, 0, now=NOW).url)
    other = signer.signature(job_id, index, expires)
    assert other == signature and len(signature) == 43  # base64url of 32 bytes, no padding
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    tampered = [
        (JOB[:-1] + "9", index, expires, signature),  # another job
        (job_id, 1, expires, signature),  # another image
        (job_id, index, expires + 3600, signature),  # a later expiry
        (job_id, index, expires, flipped),
        (job_id, index, expires, signature[:-1]),
        (job_id, index, expires, signature + "A"),
        (job_id, index, expires, ""),
        (job_id, index, expires, "é" * 43),  # not ASCII: refused, not a TypeError (a 500)
    ]
    for case in tampered:
        with pytest.raises(LinkInvalid) as refused:
            signer.check(*case, now=NOW)
        assert refused.value.http_status == 403
    # Another deployment's key signs other links.
    with pytest.raises(LinkInvalid):
        ResultLinkSigner(b"x" * 32, ttl_s=3600).check(job_id, index, expires, signature, now=NOW)


def test_the_signature_is_checked_before_the_expiry():
    # A forged link is 403 even when its expiry has passed: 410 is for links this service issued.
    signer = ResultLinkSigner(KEY, ttl_s=60)
    with pytest.raises(LinkInvalid):
        signer.check(JOB, 0, 1, "forged", now=NOW)
    with pytest.raises(LinkExpired):
        signer.check(JOB, 0, 1, signer.signature(JOB, 0, 1), now=NOW)


def test_signatures_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch):
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    signer = ResultLinkSigner(KEY, ttl_s=60)
    with pytest.raises(LinkInvalid):
        signer.check(JOB, 0, 2_000_000_000, "x" * 43, now=NOW)
    assert compared == [(signer.signature(JOB, 0, 2_000_000_000).encode(), b"x" * 43)]


def test_reads_within_a_step_give_the_same_link():
    signer = ResultLinkSigner(KEY, ttl_s=86400)
    first = signer.link("http://h", JOB, 0, now=NOW)
    assert signer.link("http://h", JOB, 0, now=NOW + 30) == first  # rounded up to 5 minutes
    later = signer.link("http://h", JOB, 0, now=NOW + MAX_ROUNDING_S + 1)
    assert later.expires > first.expires
    assert ResultLinkSigner(KEY, ttl_s=5).expiry(NOW) == NOW + 6  # short TTLs: 1 s steps
    # Steps count from the job's end: links made in its first minutes (its webhook, its final event, the
    # object read right after) are one link, wherever the clock's own 5-minute marks fall.
    ended = NOW - 1
    at_end = signer.link("http://h", JOB, 0, now=ended, since=ended)
    assert signer.link("http://h", JOB, 0, now=NOW + 1, since=ended) == at_end
    assert signer.link("http://h", JOB, 0, now=ended + MAX_ROUNDING_S - 1, since=ended) == at_end
    assert at_end.expires == ended + 86400 + MAX_ROUNDING_S
    assert signer.link("http://h", JOB, 0, now=ended + MAX_ROUNDING_S, since=ended).expires > at_end.expires


def test_the_key_comes_from_the_secret_else_from_public_settings():
    secret = "s" * 40
    keyed = ResultLinkSigner.from_settings(ServiceSettings(result_url_secret=secret, result_url_ttl_s=60))
    assert keyed.keyed and keyed.ttl_s == 60
    assert keyed.signature(JOB, 0, 1) == ResultLinkSigner(secret.encode(), 60).signature(JOB, 0, 1)
    # No secret (allowed with API keys off only): every replica and worker derives the same key.
    one, two = (ResultLinkSigner.from_settings(ServiceSettings()) for _ in range(2))
    assert not one.keyed and one.signature(JOB, 0, 1) == two.signature(JOB, 0, 1)
    assert one.signature(JOB, 0, 1) != keyed.signature(JOB, 0, 1)
    other = ResultLinkSigner.from_settings(ServiceSettings(redis_prefix="other"))
    assert other.signature(JOB, 0, 1) != one.signature(JOB, 0, 1)


def test_link_settings_are_checked_at_start():
    with pytest.raises(ValidationError, match="at least 32 characters"):
        ServiceSettings(result_url_secret="short")
    with pytest.raises(ValidationError):
        ServiceSettings(result_url_ttl_s=0)
    assert ServiceSettings(public_url=" https://a.example.com:8443/api/ ").public_url == (
        "https://a.example.com:8443/api"
    )
    for bad in ("ftp://a.example.com", "a.example.com", "https://", "https://a?x=1", "https://a#f",
                "https://user:pw@a.example.com", "https://a.example.com:port"):  # fmt: skip
        with pytest.raises(ValidationError, match="not a base URL"):
            ServiceSettings(public_url=bad)
    # The secret never shows in the settings' repr (logs, tracebacks).
    assert "s" * 40 not in repr(ServiceSettings(result_url_secret="s" * 40))

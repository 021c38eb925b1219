"""Signed result links: an absolute, expiring URL of one result image that needs no API key.

    {base}/v1/results/{job_id}?index={n}&expires={unix seconds}&signature={base64url HMAC-SHA256}

The signature is an HMAC-SHA256, keyed with DREAMOMNI2_RESULT_URL_SECRET, over the job id, the index
and the expiry, so none of them can be changed without it failing. The gateway checks it before it
looks the job up: a forged or altered link is refused the same way whether its job exists or not.
The gateway signs the links of the job objects it answers with; the GPU workers sign those of the
webhooks they queue (and so need the same key and DREAMOMNI2_PUBLIC_URL).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from api_schemas.errors import LinkExpired, LinkInvalid
from workers.config import ServiceSettings

#: The route that serves signed links (`app.routes.results`).
RESULTS_PATH = "/v1/results"
#: What is signed, besides the link's parts: a key used for anything else never signs a valid link.
_PURPOSE = b"dreamomni2 result link v1"
#: Longest a link's expiry is rounded up by, so that a job object read twice shows the same link.
MAX_ROUNDING_S = 300


@dataclass(frozen=True)
class SignedLink:
    url: str
    expires: int  # Unix seconds

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.expires, tz=UTC)


class ResultLinkSigner:
    """Signs and checks result links with one key; `ttl_s` is how long a new link works (at least)."""

    def __init__(self, key: bytes, ttl_s: int, *, keyed: bool = True):
        self._key = key
        self.ttl_s = ttl_s
        #: False when no secret is configured and the key is derived from public settings (auth off).
        self.keyed = keyed

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> ResultLinkSigner:
        """The deployment's signer. Without DREAMOMNI2_RESULT_URL_SECRET (allowed only while API keys
        are off, when every result is public anyway) the key is derived from the Redis prefix: every
        replica and worker derives the same one, so links still work across them, but anyone can forge
        them."""
        secret = settings.result_url_secret.get_secret_value()
        if secret:
            return cls(secret.encode(), settings.result_url_ttl_s)
        derived = hashlib.sha256(b"dreamomni2 unkeyed result links:" + settings.redis_prefix.encode())
        return cls(derived.digest(), settings.result_url_ttl_s, keyed=False)

    def signature(self, job_id: str, index: int, expires: int) -> str:
        message = b"\n".join([_PURPOSE, job_id.encode(), str(index).encode(), str(expires).encode()])
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def expiry(self, now: float, since: float = 0.0) -> int:
        """The expiry of a link made at `now`: `ttl_s` later, rounded up to a step of a tenth of the TTL
        (1 s to `MAX_ROUNDING_S`) counted from `since` (the job's end), so every link made within a step
        is the same one: the job object read twice, its webhook and its final event agree (and caches
        can keep the image)."""
        step = min(max(self.ttl_s // 10, 1), MAX_ROUNDING_S)
        start = int(since)
        return start + self.ttl_s + (max(0, int(now) - start) // step + 1) * step

    def link(
        self, base_url: str, job_id: str, index: int, now: float | None = None, since: float = 0.0
    ) -> SignedLink:
        expires = self.expiry(time.time() if now is None else now, since)
        signature = self.signature(job_id, index, expires)
        path = f"{RESULTS_PATH}/{quote(job_id, safe='')}"
        query = f"index={index}&expires={expires}&signature={signature}"
        return SignedLink(f"{base_url.rstrip('/')}{path}?{query}", expires)

    def check(self, job_id: str, index: int, expires: int, signature: str, now: float | None = None) -> None:
        """Raise `LinkInvalid` unless the signature is this key's for these parts (compared in constant
        time), then `LinkExpired` if the link is past its expiry. Nothing here reads the job."""
        expected = self.signature(job_id, index, expires).encode()
        if not hmac.compare_digest(expected, signature.encode("utf-8", "replace")):
            raise LinkInvalid(
                "This result link is not valid: it was not issued by this service, or a part of it was "
                "changed. Read the job (GET /v1/jobs/{id} with its API key) for a fresh link."
            )
        if (time.time() if now is None else now) >= expires:
            expired_at = datetime.fromtimestamp(expires, tz=UTC).isoformat()
            raise LinkExpired(
                f"This result link expired at {expired_at}; read the job (GET /v1/jobs/{{id}} with its API "
                "key) for a fresh link.",
                details={"expired_at": expired_at},
            )

    def at(self, base_url: str) -> ResultLinks:
        return ResultLinks(self, base_url.rstrip("/"))


@dataclass(frozen=True)
class ResultLinks:
    """Links at one base URL: DREAMOMNI2_PUBLIC_URL, or the base of the request being answered."""

    signer: ResultLinkSigner
    base_url: str

    def link(self, job_id: str, index: int, now: float | None = None, since: float = 0.0) -> SignedLink:
        return self.signer.link(self.base_url, job_id, index, now, since)

"""API keys: configured as SHA-256 hashes, sent as `Authorization: Bearer <key>`."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

from fastapi import Request

from api_schemas.errors import Unauthorized
from app.settings import AuthMode, GatewaySettings

logger = logging.getLogger(__name__)

#: Owner of every job when auth is off.
ANONYMOUS = "anonymous"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "do2_" + secrets.token_urlsafe(32)


def parse_key_entries(entries: str) -> dict[str, str]:
    """`name:sha256hex,name2:sha256hex` -> {hash: name}; refuses anything that is not a hash."""
    keys: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in entries.split(","))):
        name, sep, digest = entry.partition(":")
        digest = digest.strip().lower()
        if not sep or not name or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(
                f"DREAMOMNI2_API_KEYS entry {entry[:12]!r}... is not `name:<sha256 hex>`; "
                "make one with `python -m app hash-key NAME` (keys are never configured in clear)."
            )
        keys[digest] = name.strip()
    return keys


class KeyRing:
    """Checks bearer keys against the configured hashes and names the owner."""

    def __init__(self, settings: GatewaySettings):
        self.keys = parse_key_entries(settings.api_keys)
        if settings.auth is AuthMode.ON and not self.keys:
            raise ValueError(
                "DREAMOMNI2_AUTH=on but DREAMOMNI2_API_KEYS is empty: no one could call the API."
            )
        self.enabled = settings.auth is AuthMode.ON or (settings.auth is AuthMode.AUTO and bool(self.keys))
        if not self.enabled:
            banner = "!" * 78
            logger.warning(
                "\n%s\n!! AUTH IS OFF: anyone who can reach this port can submit jobs and read every\n"
                "!! result. Set DREAMOMNI2_API_KEYS (see `python -m app hash-key`) before exposing it.\n%s",
                banner,
                banner,
            )

    def owner(self, request: Request) -> str:
        if not self.enabled:
            return ANONYMOUS
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Send your API key as `Authorization: Bearer <key>`.", code="missing_api_key")
        digest = hash_key(token.strip())
        for known, name in self.keys.items():
            if hmac.compare_digest(known, digest):
                return name
        raise Unauthorized("The API key is not known to this service.", code="invalid_api_key")

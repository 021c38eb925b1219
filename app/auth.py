"""API keys: configured as SHA-256 hashes, sent as `Authorization: Bearer <key>`."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api_schemas.errors import ErrorCode, Unauthorized
from app.settings import GatewaySettings

logger = logging.getLogger(__name__)

#: The security scheme OpenAPI shows; it reads the header and leaves the refusals to `KeyRing`.
BEARER = HTTPBearer(
    auto_error=False,
    description="An API key (`python -m app hash-key NAME` makes one) when the deployment has keys.",
)

#: Owner of every job when auth is off.
ANONYMOUS = "anonymous"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "do2_" + secrets.token_urlsafe(32)


class KeyRing:
    """Checks bearer keys against the configured hashes and names the owner."""

    def __init__(self, settings: GatewaySettings):
        self.keys = settings.api_keys
        self.enabled = settings.auth_enabled
        if not self.enabled:
            banner = "!" * 78
            logger.warning(
                "\n%s\n!! AUTH IS OFF: anyone who can reach this port can submit jobs and read every\n"
                "!! result. Set DREAMOMNI2_API_KEYS (see `python -m app hash-key`) before exposing it.\n%s",
                banner,
                banner,
            )

    def knows(self, credentials: HTTPAuthorizationCredentials | None) -> bool:
        """Whether the caller may see the service's internals: auth is off, or its key is known."""
        try:
            self.owner(credentials)
        except Unauthorized:
            return False
        return True

    def owner(self, credentials: HTTPAuthorizationCredentials | None) -> str:
        """Who is calling: the key's name, or `ANONYMOUS` with auth off."""
        if not self.enabled:
            return ANONYMOUS
        token = credentials.credentials.strip() if credentials is not None else ""
        if not token:
            raise Unauthorized(
                "Send your API key as `Authorization: Bearer <key>`.", code=ErrorCode.MISSING_API_KEY
            )
        digest = hash_key(token)
        for known, name in self.keys.items():
            if hmac.compare_digest(known, digest):
                return name
        raise Unauthorized("The API key is not known to this service.", code=ErrorCode.INVALID_API_KEY)

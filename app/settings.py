"""Gateway settings, read from `DREAMOMNI2_*` environment variables."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_settings import NoDecode

from workers.config import ServiceSettings


class AuthMode(StrEnum):
    AUTO = "auto"  # on when keys are configured, off (with a loud warning) when none are
    ON = "on"
    OFF = "off"


def parse_key_entries(entries: object) -> object:
    """`name:sha256hex,name2:sha256hex` -> {hash: name}; refuses anything that is not a hash.

    The validator of `DREAMOMNI2_API_KEYS` (a mapping from code passes through).
    """
    if not isinstance(entries, str):
        return entries
    keys: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in entries.split(","))):
        name, sep, digest = entry.partition(":")
        digest = digest.strip().lower()
        if not sep or not name or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(
                f"the entry {entry[:12]!r}... is not `name:<sha256 hex>`; make one with "
                "`python -m app hash-key NAME` (keys are never configured in clear)"
            )
        keys[digest] = name.strip()
    return keys


def _origins(value: object) -> object:
    """`DREAMOMNI2_CORS_ORIGINS`: comma-separated `scheme://host[:port]` origins (or `*`)."""
    if not isinstance(value, str):
        return value
    origins = [item.strip().rstrip("/") for item in value.split(",") if item.strip()]
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"{origin!r} is not an origin like https://app.example.com (no path)")
    return origins


class KeyLimits(BaseModel):
    """One API key's own quotas (`DREAMOMNI2_KEY_LIMITS`); what it leaves out takes the defaults."""

    model_config = ConfigDict(extra="forbid")

    rate: float | None = Field(default=None, gt=0, description="Submissions per second, on average.")
    burst: int | None = Field(default=None, ge=1, description="Submissions at once, after a pause.")
    active: int | None = Field(default=None, ge=1, description="Jobs queued or running at once.")


class GatewaySettings(ServiceSettings):
    host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(default=8000, description="Port the gateway listens on (`make up`).")
    auth: AuthMode = Field(default=AuthMode.AUTO, description="`auto`, `on` or `off`.")
    api_keys: Annotated[dict[str, str], NoDecode, BeforeValidator(parse_key_entries)] = Field(
        default_factory=dict,
        description="Comma-separated `name:sha256-hex` entries; `python -m app hash-key` makes one.",
    )
    max_request_bytes: int = Field(
        default=110 * 1024 * 1024, description="Largest request body accepted (413 above it)."
    )
    max_wait_s: int = Field(default=60, ge=0, description="Longest `Prefer: wait=N` honoured.")
    deadline_sweep_s: float = Field(
        default=1.0, gt=0, description="How often queued jobs' deadlines are checked."
    )
    threads: int = Field(default=128, ge=8, description="Threads for blocking Redis and image work.")
    redis_min_replicas: int = Field(
        default=0,
        ge=0,
        description="Replicas a new job's write must reach (Redis WAIT) before it is answered 202; "
        "if it cannot, nothing is stored and the answer is 503.",
    )
    rate_limit_per_s: float = Field(
        default=10.0, gt=0, description="Submissions per second per API key, on average (token bucket)."
    )
    rate_limit_burst: int = Field(default=60, ge=1, description="Submissions per API key at once.")
    max_active_jobs_per_key: int = Field(default=200, ge=1, description="Jobs queued or running per key.")
    max_queue_depth: int = Field(default=10_000, ge=1, description="Jobs queued in all; 429 beyond it.")
    key_limits: dict[str, KeyLimits] = Field(
        default_factory=dict,
        description='Per-key quotas, JSON: {"alice": {"rate": 1, "burst": 5, "active": 10}}.',
    )
    cors_origins: Annotated[list[str], NoDecode, BeforeValidator(_origins)] = Field(
        default_factory=list,
        description="Comma-separated origins (`https://app.example.com`) whose browser pages may call "
        "the API; empty (the default) turns CORS off.",
    )

    @property
    def auth_enabled(self) -> bool:
        """Whether `/v1` calls need a key: `on`, or `auto` with keys configured."""
        return self.auth is AuthMode.ON or (self.auth is AuthMode.AUTO and bool(self.api_keys))

    @model_validator(mode="after")
    def _keys_when_auth_is_on(self) -> GatewaySettings:
        if self.auth is AuthMode.ON and not self.api_keys:
            raise ValueError(
                "DREAMOMNI2_AUTH=on but DREAMOMNI2_API_KEYS is empty: no one could call the API."
            )
        if self.auth_enabled and not self.result_url_secret.get_secret_value():
            # Without a key of its own every link would be forgeable; a random one per process would
            # break links across replicas and in webhooks.
            raise ValueError(
                "API keys are on but DREAMOMNI2_RESULT_URL_SECRET is empty: result links, which download "
                "without a key, need a secret key shared by every gateway replica and worker. Make one "
                "with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return self

"""Gateway settings, read from `DREAMOMNI2_*` environment variables."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache

from pydantic import Field

from workers.config import ServiceSettings


class AuthMode(StrEnum):
    AUTO = "auto"  # on when keys are configured, off (with a loud warning) when none are
    ON = "on"
    OFF = "off"


class GatewaySettings(ServiceSettings):
    host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(default=8000, description="Port the gateway listens on (`make up`).")
    auth: AuthMode = Field(default=AuthMode.AUTO, description="`auto`, `on` or `off`.")
    api_keys: str = Field(
        default="",
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


@lru_cache
def get_settings() -> GatewaySettings:
    return GatewaySettings()

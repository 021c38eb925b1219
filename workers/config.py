"""Settings of the gateway and the workers, read from `DREAMOMNI2_*` environment variables."""

from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from standardwebhooks import Webhook

from api_schemas.jobs import JobLimits
from workers.destinations import Allowlist
from workers.logs import LogFormat
from workers.store.connection import RedisTarget


def comma_separated(value: object) -> object:
    """`a, b,,c` -> ["a", "b", "c"]; lists (from code) pass through."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def parse_webhook_secrets(value: object) -> object:
    """`name:whsec_...,name2:whsec_...` -> {owner name: secret}, each secret checked."""
    if not isinstance(value, str):
        return value
    secrets: dict[str, str] = {}
    for entry in comma_separated(value):
        name, _, secret = entry.partition(":")
        secret = secret.strip()
        if not name.strip() or not secret.startswith("whsec_"):
            raise ValueError(f"the entry for {name.strip()!r} is not `name:whsec_...`")
        try:
            Webhook(secret)
        except Exception:
            raise ValueError(f"the secret for {name.strip()!r} is not `whsec_` + base64") from None
        secrets[name.strip()] = secret
    return secrets


def parse_allowlist(value: object) -> object:
    return Allowlist.parse(value) if isinstance(value, str) else value


def parse_sentinels(value: object) -> object:
    """`host:port,host:port` -> [(host, port), ...] (`[::1]:26379` for an IPv6 address); lists pass."""
    if not isinstance(value, str):
        return value
    sentinels = []
    for entry in comma_separated(value):
        host, _, port = entry.rpartition(":")
        host = host.strip().removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"the sentinel {entry!r} is not `host:port` (e.g. `redis-sentinel:26379`)")
        sentinels.append((host, int(port)))
    return sentinels


def check_webhook_secret(value: object) -> object:
    """The deployment's secret, if set, must be `whsec_` + base64 like the per-key ones."""
    if isinstance(value, str) and value.strip():
        parse_webhook_secrets(f"deployment:{value.strip()}")
        return value.strip()
    return value


#: The shortest DREAMOMNI2_RESULT_URL_SECRET accepted: whoever guesses the key can mint result links.
MIN_RESULT_URL_SECRET_CHARS = 32


def check_result_url_secret(value: object) -> object:
    """The result links' key, if set, must be long enough not to be guessed."""
    if isinstance(value, str) and 0 < len(value.strip()) < MIN_RESULT_URL_SECRET_CHARS:
        raise ValueError(
            f"DREAMOMNI2_RESULT_URL_SECRET must be at least {MIN_RESULT_URL_SECRET_CHARS} characters; make "
            "one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return value.strip() if isinstance(value, str) else value


def check_public_url(value: object) -> object:
    """`DREAMOMNI2_PUBLIC_URL`: `http(s)://host[:port][/prefix]`, no query or credentials; no final `/`."""
    if not isinstance(value, str) or not value.strip():
        return value
    url = value.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(
            f"{value!r} is not a base URL like https://dreamomni2.example.com (http or https, a host, "
            "optionally a port and a path prefix; no query, fragment or credentials)"
        )
    return url


class ServiceSettings(BaseSettings):
    """What the gateway and the workers must agree on: where Redis is and how jobs live there."""

    model_config = SettingsConfigDict(env_prefix="DREAMOMNI2_", extra="ignore")

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis: broker, state, results.")
    redis_sentinels: Annotated[list[tuple[str, int]], NoDecode, BeforeValidator(parse_sentinels)] = Field(
        default_factory=list,
        description="Redis Sentinels, `host:port` comma-separated: the primary is the one they name "
        "(DREAMOMNI2_REDIS_SENTINEL_MASTER); the URL then gives only the database and the password.",
    )
    redis_sentinel_master: str = Field(
        default="", description="The name the sentinels monitor the primary by."
    )
    redis_sentinel_password: str = Field(
        default="", description="The sentinels' own password, where they ask for one."
    )
    redis_prefix: str = Field(default="do2", description="Prefix of every key the service writes.")
    queue: str = Field(default="dreamomni2.jobs", description="Celery queue the GPU workers consume.")
    job_ttl_s: int = Field(default=24 * 3600, ge=1, description="How long jobs, inputs and results are kept.")
    job_timeout_s: int = Field(
        default=900, ge=1, description="Longest a job may run before it fails (timeout)."
    )
    max_attempts: int = Field(default=3, ge=1, description="Runs of a job whose worker died before it fails.")
    webhook_secret: Annotated[str, BeforeValidator(check_webhook_secret)] = Field(
        default="", description="The deployment's `whsec_...` secret signing webhooks (Standard Webhooks)."
    )
    webhook_secrets: Annotated[dict[str, str], NoDecode, BeforeValidator(parse_webhook_secrets)] = Field(
        default_factory=dict,
        description="Per-API-key secrets, `name:whsec_...` comma-separated; override the above.",
    )
    webhook_allowlist: Annotated[Allowlist, NoDecode, BeforeValidator(parse_allowlist)] = Field(
        default_factory=Allowlist.empty,
        description="Hosts or CIDRs admitted as webhook destinations although not public.",
    )
    webhook_backoff_s: float = Field(
        default=30.0, gt=0, description="First retry delay; it doubles each time."
    )
    webhook_max_attempts: int = Field(default=8, ge=1, description="Delivery attempts before giving up.")
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="Per-attempt timeout.")
    webhook_queue: str = Field(
        default="dreamomni2.webhooks", description="Celery queue of webhook deliveries."
    )
    webhook_concurrency: int = Field(default=16, ge=1, description="Threads of a webhook delivery worker.")
    webhook_progress_interval_s: float = Field(
        default=2.0, ge=0, description="Least time between two `progress` webhooks of one job."
    )
    log_format: LogFormat = Field(
        default=LogFormat.TEXT,
        description="`text` (development) or `json` (one object per line: the images).",
    )
    # Signed result links (`workers.result_links`): the gateway signs and checks them, the GPU workers
    # sign the ones in webhooks, so both need the same values.
    result_url_secret: Annotated[SecretStr, BeforeValidator(check_result_url_secret)] = Field(
        default=SecretStr(""),
        description="The key signing result links, the same in every gateway replica and worker; required "
        "when API keys are on.",
    )
    result_url_ttl_s: int = Field(
        default=3600, ge=1, le=365 * 86400, description="How long a signed result link works."
    )
    public_url: Annotated[str, BeforeValidator(check_public_url)] = Field(
        default="",
        description="The gateway's address as callers reach it (`https://host[/prefix]`): the base of "
        "signed result links. Empty: the request's own (no link in webhooks).",
    )
    limits: JobLimits = Field(default_factory=JobLimits)

    @model_validator(mode="after")
    def _check_redis_target(self) -> ServiceSettings:
        self.redis_target  # noqa: B018 (refuses sentinels without a master name, and the like, at start)
        return self

    @property
    def redis_target(self) -> RedisTarget:
        """Where every process connects (`Store.from_settings`, the Celery broker, the event streams)."""
        return RedisTarget(
            self.redis_url,
            tuple(self.redis_sentinels),
            self.redis_sentinel_master,
            self.redis_sentinel_password,
        )

    @property
    def front_queue(self) -> str:
        """The Celery queue of jobs that already waited their turn (requeued after their worker died,
        or resent after their message was lost): the GPU workers take it before `queue`, so such a job
        runs next rather than after everything submitted since."""
        return f"{self.queue}.front"

    @property
    def visibility_timeout_s(self) -> int:
        """Celery's Redis redelivery delay: above the longest job, or a running job would run twice."""
        return max(3600, 2 * self.job_timeout_s)

    # Both kinds of worker (GPU and webhook) keep a liveness file for their probe.
    heartbeat_s: float = Field(default=5.0, gt=0, description="How often leases and liveness are renewed.")
    liveness_file: Path = Field(
        default=Path("/tmp/dreamomni2-worker-alive"),
        description="Touched while the worker is consuming (or waiting for Redis) and not hung; read by "
        "`python -m workers.health`.",
    )

    @property
    def webhook_visibility_timeout_s(self) -> int:
        """The webhook workers' redelivery delay: above one attempt, since no message waits longer
        (retries wait in the job store), so a delivery cut off mid-attempt is sent again soon."""
        return max(60, math.ceil(4 * self.webhook_timeout_s))


class WorkerSettings(ServiceSettings):
    """A GPU worker process: the engine's settings are read separately (`models.settings`)."""

    worker_name: str = Field(default_factory=lambda: f"worker@{socket.gethostname()}")
    lease_ttl_s: float = Field(
        default=15.0, gt=0, description="A running job's lease; renewed by heartbeats."
    )
    reaper_interval_s: float = Field(
        default=5.0, gt=0, description="How often stale running jobs are requeued."
    )
    stall_timeout_s: float = Field(
        default=300.0, gt=0, description="A job with no progress for this long marks the worker hung."
    )
    preview_every: int = Field(
        default=5,
        ge=0,
        description="Every Nth denoising step's progress event carries a preview of the image; 0: none.",
    )
    metrics_port: int = Field(
        default=9101, ge=0, description="Prometheus port of the worker; 0 turns it off."
    )

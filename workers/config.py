"""Settings of the gateway and the workers, read from `DREAMOMNI2_*` environment variables."""

from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from standardwebhooks import Webhook

from api_schemas.jobs import JobLimits
from workers.destinations import Allowlist


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


def check_webhook_secret(value: object) -> object:
    """The deployment's secret, if set, must be `whsec_` + base64 like the per-key ones."""
    if isinstance(value, str) and value.strip():
        parse_webhook_secrets(f"deployment:{value.strip()}")
        return value.strip()
    return value


class ServiceSettings(BaseSettings):
    """What the gateway and the workers must agree on: where Redis is and how jobs live there."""

    model_config = SettingsConfigDict(env_prefix="DREAMOMNI2_", extra="ignore")

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis: broker, state, results.")
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
    limits: JobLimits = Field(default_factory=JobLimits)

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
    heartbeat_s: float = Field(default=5.0, gt=0, description="How often leases and liveness are renewed.")
    reaper_interval_s: float = Field(
        default=5.0, gt=0, description="How often stale running jobs are requeued."
    )
    liveness_file: Path = Field(
        default=Path("/tmp/dreamomni2-worker-alive"),
        description="Touched while the worker is ready and not hung; read by `python -m workers.health`.",
    )
    stall_timeout_s: float = Field(
        default=300.0, gt=0, description="A job with no progress for this long marks the worker hung."
    )
    metrics_port: int = Field(
        default=9101, ge=0, description="Prometheus port of the worker; 0 turns it off."
    )

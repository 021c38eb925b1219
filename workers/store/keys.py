"""Where the store keeps things in Redis, and the numbers it writes with."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import redis
from redis.commands.core import Script

#: Entries kept per job event stream (approximate trimming: Redis keeps at least this many).
EVENTS_MAXLEN = 10_000
#: The lifetime a job hash without its own `ttl_s` field gets when a script must set one.
FALLBACK_TTL_S = 24 * 3600


@dataclass(frozen=True)
class Keys:
    """Every key name, under one prefix. Job keys all expire with the job's TTL."""

    prefix: str

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def images(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:images"

    def result(self, job_id: str, index: int = 0) -> str:
        # The first image keeps the plain name; a pair's second is `...:result:1`.
        return f"{self.prefix}:job:{job_id}:result" + (f":{index}" if index else "")

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def rate_bucket(self, owner: str) -> str:
        return f"{self.prefix}:rate:{owner}"

    def active_jobs(self, owner: str) -> str:
        return f"{self.prefix}:active:{owner}"

    def resend(self, job_id: str) -> str:
        return f"{self.prefix}:resend:{job_id}"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    @property
    def queue(self) -> str:
        return f"{self.prefix}:queue"

    @property
    def running(self) -> str:
        return f"{self.prefix}:running"

    @property
    def deadlines(self) -> str:
        return f"{self.prefix}:deadlines"

    @property
    def sequence(self) -> str:
        return f"{self.prefix}:seq"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def delivery(self, delivery_id: str) -> str:
        return f"{self.prefix}:webhook:{delivery_id}"

    @property
    def webhook_retries(self) -> str:
        return f"{self.prefix}:webhooks:due"

    def idempotency(self, owner: str, key: str) -> str:
        # Hashed: the caller's key is arbitrary text, and owners must not collide.
        digest = hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()
        return f"{self.prefix}:idem:{digest}"


def script(client: redis.Redis, name: str) -> Script:
    """One of the package's Lua scripts (`lua/<name>.lua`), registered on `client`."""
    source = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    return client.register_script(source)

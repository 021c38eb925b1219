"""The worker registry: each worker's readiness info, kept alive by its heartbeat."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import redis

from workers.store.keys import Keys

SCAN_BATCH = 100


class WorkerRegistry:
    def __init__(self, client: redis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys

    def announce(self, name: str, info: dict[str, Any], ttl_s: float) -> None:
        """Publish a worker's info; it vanishes `ttl_s` after the last announcement."""
        self.redis.set(self.keys.worker(name), json.dumps(info), px=int(ttl_s * 1000))

    def retire(self, name: str) -> None:
        self.redis.delete(self.keys.worker(name))

    def workers(self) -> Iterator[dict[str, Any]]:
        for key in self.redis.scan_iter(match=self.keys.worker("*"), count=SCAN_BATCH):
            raw = self.redis.get(key)
            if raw:
                yield json.loads(raw)

"""Webhook deliveries: the body fixed at creation, attempts counted, the last outcome on the job."""

from __future__ import annotations

import redis

from api_schemas.api import WebhookDelivery
from api_schemas.common import WebhookEvent
from api_schemas.records import DeliveryRecord
from workers.store.keys import Keys, script


class Deliveries:
    def __init__(self, client: redis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys
        self._attempt = script(client, "delivery_attempt")

    def create(
        self,
        delivery_id: str,
        *,
        job_id: str,
        owner: str,
        url: str,
        event: WebhookEvent,
        body: str,
        ttl_s: int,
    ) -> None:
        """Store a delivery (and show it pending on its job) before its message is sent."""
        record = DeliveryRecord(job_id=job_id, owner=owner, url=url, event=event, body=body, attempts=0)
        name = self.keys.delivery(delivery_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(name, mapping=record.model_dump(mode="json"))
        pipe.expire(name, ttl_s)
        pipe.execute()
        self.record_attempt(
            delivery_id, job_id, WebhookDelivery(id=delivery_id, event=event, status="pending", attempts=0)
        )

    def get(self, delivery_id: str) -> DeliveryRecord | None:
        raw = self.redis.hgetall(self.keys.delivery(delivery_id))
        return DeliveryRecord.from_hash(raw) if raw else None

    def record_attempt(self, delivery_id: str, job_id: str, summary: WebhookDelivery) -> None:
        keys = [self.keys.delivery(delivery_id), self.keys.job(job_id)]
        self._attempt(keys=keys, args=[summary.attempts, summary.model_dump_json()])

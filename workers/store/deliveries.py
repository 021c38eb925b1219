"""Webhook deliveries: the body fixed at creation, attempts counted, the last outcome on the job, and
the retries waiting for their time (a sorted set the webhook workers' schedulers claim from)."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from api_schemas.api import WebhookDelivery
from api_schemas.common import WebhookEvent
from api_schemas.records import DeliveryRecord
from workers.store.keys import Keys, script


@dataclass(frozen=True)
class ClaimedRetries:
    """Retries due now, held by one scheduler until `until` (unix time): send them, then `sent`."""

    ids: list[str]
    until: float


class Deliveries:
    def __init__(self, client: redis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys
        self._attempt = script(client, "delivery_attempt")
        self._claim_retries = script(client, "claim_retries")
        self._retry_sent = script(client, "retry_sent")

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
        request_id: str | None = None,
        traceparent: str | None = None,
    ) -> None:
        """Store a delivery (and show it pending on its job) before its message is sent; `request_id`
        and `traceparent` are its job's."""
        record = DeliveryRecord(
            job_id=job_id,
            owner=owner,
            url=url,
            event=event,
            body=body,
            attempts=0,
            request_id=request_id,
            traceparent=traceparent,
        )
        name = self.keys.delivery(delivery_id)
        pipe = self.redis.pipeline(transaction=True)
        # Unset fields are left out (a hash holds no None); `done` is the attempt script's to set.
        pipe.hset(name, mapping=record.model_dump(mode="json", exclude_none=True, exclude={"done"}))
        pipe.expire(name, ttl_s)
        pipe.execute()
        self.record_attempt(
            delivery_id, job_id, WebhookDelivery(id=delivery_id, event=event, status="pending", attempts=0)
        )

    def get(self, delivery_id: str) -> DeliveryRecord | None:
        raw = self.redis.hgetall(self.keys.delivery(delivery_id))
        return DeliveryRecord.from_hash(raw) if raw else None

    def record_attempt(
        self,
        delivery_id: str,
        job_id: str,
        summary: WebhookDelivery,
        retry_at: float | None = None,
        final: bool = False,
    ) -> None:
        """Write an attempt's outcome and, with `retry_at` (unix time), schedule the next attempt; an
        attempt without one cancels any retry still waiting; a `final` one marks the delivery done.
        Nothing is written for an expired delivery."""
        keys = [self.keys.delivery(delivery_id), self.keys.job(job_id), self.keys.webhook_retries]
        due = "" if retry_at is None else repr(float(retry_at))
        args = [summary.attempts, summary.model_dump_json(), delivery_id, due, "1" if final else "0"]
        self._attempt(keys=keys, args=args)

    def claim_retries(self, now: float, claim_s: float, limit: int = 100) -> ClaimedRetries:
        """Take up to `limit` retries due by `now` for `claim_s` seconds: another caller does not get
        them meanwhile, and those not marked `sent` by then are due again."""
        until = now + claim_s
        ids = self._claim_retries(keys=[self.keys.webhook_retries], args=[repr(now), repr(until), limit])
        return ClaimedRetries([raw.decode() for raw in ids], until)

    def sent(self, delivery_id: str, claimed: ClaimedRetries) -> None:
        """A claimed retry's message is sent: it no longer waits (unless rescheduled since)."""
        self._retry_sent(keys=[self.keys.webhook_retries], args=[delivery_id, repr(claimed.until)])

    def retry_due(self, delivery_id: str) -> float | None:
        """When the delivery's waiting retry is due (unix time), or None when none waits."""
        return self.redis.zscore(self.keys.webhook_retries, delivery_id)

"""Webhook retries waiting in Redis: scheduled by a failed attempt, claimed once when due, sent by the
webhook worker's scheduler thread; and the webhook workers' own broker settings. Real Redis."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from api_schemas.api import WebhookDelivery
from api_schemas.common import WebhookEvent
from app.stack import free_port
from workers.celery_app import DELIVER_TASK, create_celery, create_webhook_celery
from workers.config import ServiceSettings
from workers.store import Store
from workers.webhooks import RetryScheduler, WebhookDeliverer

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SETTINGS = ServiceSettings(webhook_secret=SECRET, webhook_backoff_s=30, webhook_max_attempts=8)


@pytest.fixture
def stores(redis_url) -> Store:
    return Store.connect(redis.Redis.from_url(redis_url), prefix=f"t{uuid.uuid4().hex[:8]}")


def new_delivery(stores: Store, url: str = "http://127.0.0.1:9/hook") -> str:
    delivery_id = f"msg_{uuid.uuid4().hex}"
    stores.deliveries.create(
        delivery_id, job_id="j_1", owner="alice", url=url, event=WebhookEvent.COMPLETED, body="{}", ttl_s=60
    )
    return delivery_id


def schedule(stores: Store, delivery_id: str, retry_at: float) -> None:
    summary = WebhookDelivery(id=delivery_id, event=WebhookEvent.COMPLETED, status="retrying", attempts=1)
    stores.deliveries.record_attempt(delivery_id, "j_1", summary, retry_at=retry_at)


class SentTasks:
    """Stands in for the Celery app: records what `send_task` was asked to send."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.sent: list[tuple[str, list, str]] = []
        self.lock = threading.Lock()

    def send_task(self, name: str, args: list, queue: str) -> None:
        if self.fail:
            raise ConnectionError("the broker is away")
        with self.lock:
            self.sent.append((name, args, queue))


def test_only_due_retries_are_claimed_and_only_once(stores):
    now = time.time()
    due, later = new_delivery(stores), new_delivery(stores)
    schedule(stores, due, now - 1)
    schedule(stores, later, now + 30)

    claimed = stores.deliveries.claim_retries(now, claim_s=60)
    assert claimed.ids == [due] and claimed.until == now + 60
    assert stores.deliveries.claim_retries(now, claim_s=60).ids == []  # held by the first claim
    assert stores.deliveries.retry_due(later) == pytest.approx(now + 30)

    stores.deliveries.sent(due, claimed)
    assert stores.deliveries.retry_due(due) is None
    assert stores.deliveries.claim_retries(now + 61, claim_s=60).ids == [later]


def test_a_claimed_retry_not_sent_comes_back_after_the_claim(stores):
    delivery_id = new_delivery(stores)
    now = time.time()
    schedule(stores, delivery_id, now)
    assert stores.deliveries.claim_retries(now, claim_s=60).ids == [delivery_id]
    assert stores.deliveries.claim_retries(now + 59, claim_s=60).ids == []
    assert stores.deliveries.claim_retries(now + 60, claim_s=60).ids == [delivery_id]


def test_a_retry_scheduled_again_before_sent_is_marked_keeps_waiting(stores):
    # The message was sent and its attempt failed (a new retry scheduled) before the scheduler marked
    # the claim sent: the new retry stays.
    delivery_id = new_delivery(stores)
    now = time.time()
    schedule(stores, delivery_id, now)
    claimed = stores.deliveries.claim_retries(now, claim_s=60)
    schedule(stores, delivery_id, now + 30)
    stores.deliveries.sent(delivery_id, claimed)
    assert stores.deliveries.retry_due(delivery_id) == pytest.approx(now + 30)


def test_a_final_attempt_cancels_a_waiting_retry_and_an_expired_delivery_is_not_written(stores):
    delivery_id = new_delivery(stores)
    schedule(stores, delivery_id, time.time() + 30)
    done = WebhookDelivery(id=delivery_id, event=WebhookEvent.COMPLETED, status="delivered", attempts=2)
    stores.deliveries.record_attempt(delivery_id, "j_1", done)
    assert stores.deliveries.retry_due(delivery_id) is None
    assert not stores.redis.exists(stores.keys.webhook_retries)  # no retry waits: the key is gone

    stores.redis.delete(stores.keys.delivery(delivery_id))  # expired
    schedule(stores, delivery_id, time.time())
    assert not stores.redis.exists(stores.keys.delivery(delivery_id), stores.keys.webhook_retries)


def test_a_failed_attempt_schedules_its_retry_uncapped(stores):
    # The destination is refused (loopback, no allowlist): a failed attempt, retried. The wait is the
    # full backoff, however far past the broker's visibility timeout it reaches.
    settings = SETTINGS.model_copy(update={"webhook_backoff_s": 10_000.0})
    delivery_id = new_delivery(stores)
    before = time.time()
    assert WebhookDeliverer(stores, settings).deliver(delivery_id) == 10_000
    assert before + 10_000 <= stores.deliveries.retry_due(delivery_id) <= time.time() + 10_000
    assert stores.deliveries.get(delivery_id).attempts == 1
    assert 0 < stores.redis.ttl(stores.keys.delivery(delivery_id)) <= 60

    last = SETTINGS.model_copy(update={"webhook_max_attempts": 2})
    assert WebhookDeliverer(stores, last).deliver(delivery_id) is None  # the second and last attempt
    assert stores.deliveries.retry_due(delivery_id) is None


def test_the_scheduler_sends_due_retries_once_each_across_workers(stores):
    now = time.time()
    ids = {new_delivery(stores) for _ in range(250)}
    for delivery_id in ids:
        schedule(stores, delivery_id, now - 1)
    later = new_delivery(stores)
    schedule(stores, later, now + 30)

    celery = SentTasks()
    schedulers = [RetryScheduler(stores, celery, SETTINGS) for _ in range(4)]
    threads = [threading.Thread(target=s.run_once, kwargs={"batch": 20}) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    sent = [args[0] for _, args, _ in celery.sent]
    assert sorted(sent) == sorted(ids)  # each once, none missed
    assert {(name, queue) for name, _, queue in celery.sent} == {(DELIVER_TASK, SETTINGS.webhook_queue)}
    assert stores.redis.zrange(stores.keys.webhook_retries, 0, -1) == [later.encode()]


def test_a_retry_whose_message_could_not_be_sent_stays_claimed(stores):
    delivery_id = new_delivery(stores)
    schedule(stores, delivery_id, time.time() - 1)
    with pytest.raises(ConnectionError):
        RetryScheduler(stores, SentTasks(fail=True), SETTINGS, claim_s=60).run_once()
    assert stores.deliveries.retry_due(delivery_id) == pytest.approx(time.time() + 60, abs=5)


def test_the_scheduler_thread_outlives_redis_errors_and_stops(stores, redis_url):
    away = Store.from_url(f"redis://127.0.0.1:{free_port()}/0", stores.keys.prefix)
    scheduler = RetryScheduler(away, SentTasks(), SETTINGS, poll_s=0.05)
    scheduler.start()
    time.sleep(0.3)  # a few failed polls
    assert scheduler._thread is not None and scheduler._thread.is_alive()
    scheduler.store = stores  # Redis is back
    delivery_id = new_delivery(stores)
    schedule(stores, delivery_id, time.time())
    deadline = time.monotonic() + 5
    while scheduler.celery.sent == [] and time.monotonic() < deadline:
        time.sleep(0.05)
    scheduler.stop()
    assert [args for _, args, _ in scheduler.celery.sent] == [[delivery_id]]
    assert not scheduler._thread.is_alive()


def test_webhook_workers_have_their_own_short_visibility_timeout_and_unacked_keys(redis_url):
    settings = ServiceSettings(redis_url=redis_url, webhook_timeout_s=10, job_timeout_s=900)
    assert settings.webhook_visibility_timeout_s == 60
    assert ServiceSettings(webhook_timeout_s=30).webhook_visibility_timeout_s == 120

    def channel_settings(app) -> tuple:
        with app.connection_for_read() as connection:
            channel = connection.default_channel
            keys = (channel.unacked_key, channel.unacked_index_key, channel.unacked_mutex_key)
            return (*keys, channel.visibility_timeout, channel.unacked_restore_throttle)

    webhooks = channel_settings(create_webhook_celery(settings))
    assert webhooks == ("unacked_webhooks", "unacked_webhooks_index", "unacked_webhooks_mutex", 60, 1)
    # The GPU workers' and the gateway's app keeps Kombu's keys (`jobs_with_messages` reads them).
    jobs = channel_settings(create_celery(settings))
    assert jobs == ("unacked", "unacked_index", "unacked_mutex", 3600, 10)

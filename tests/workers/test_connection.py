"""How the processes reach Redis (`workers.store.connection`): the Sentinel settings, and every kind of
client (the store's, bounded or not, the async one, Celery's broker) on a real Sentinel-managed Redis."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from api_schemas.api import OutputFormat
from api_schemas.common import Task
from api_schemas.jobs import JobLimits, JobParameters, resolve_job
from api_schemas.records import JobSpec
from app.stack import SentinelRedis
from workers import broker
from workers.celery_app import create_celery, enqueue, jobs_with_messages
from workers.config import ServiceSettings
from workers.store import RedisTarget, Store

SPEC = JobSpec(
    job=resolve_job(JobParameters(instruction="x", task=Task.GENERATE, steps=4), 0, JobLimits()),
    output_format=OutputFormat.PNG,
)


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("URL", "SENTINELS", "SENTINEL_MASTER", "SENTINEL_PASSWORD"):
        monkeypatch.delenv(f"DREAMOMNI2_REDIS_{name}", raising=False)
    return monkeypatch


# Settings -------------------------------------------------------------------------------------------
def test_sentinels_and_the_master_come_from_the_environment(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("DREAMOMNI2_REDIS_SENTINELS", "sentinel-0:26379, [fd00::7]:26380,,")
    environ.setenv("DREAMOMNI2_REDIS_SENTINEL_MASTER", "do2")
    environ.setenv("DREAMOMNI2_REDIS_URL", "redis://:s%40cret@ignored:6379/3")
    target = ServiceSettings().redis_target
    assert target.sentinels == (("sentinel-0", 26379), ("fd00::7", 26380)) and target.master == "do2"
    assert target.credentials() == {"db": 3, "password": "s@cret"}
    # Kombu asks each sentinel in turn, with the database and the password (quoted) of the URL.
    assert (
        target.broker_url == "sentinel://:s%40cret@sentinel-0:26379/3;sentinel://:s%40cret@[fd00::7]:26380/3"
    )
    assert target.broker_options["master_name"] == "do2"
    assert "password" not in target.broker_options["sentinel_kwargs"]  # sentinels without a password
    environ.setenv("DREAMOMNI2_REDIS_SENTINEL_PASSWORD", "their-own")
    assert ServiceSettings().redis_target.broker_options["sentinel_kwargs"]["password"] == "their-own"


def test_without_sentinels_the_url_is_used_as_it_is(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("DREAMOMNI2_REDIS_URL", "rediss://user:pw@redis.example:6380/2")
    target = ServiceSettings().redis_target
    assert not target.uses_sentinel
    assert target.broker_url == "rediss://user:pw@redis.example:6380/2" and target.broker_options == {}


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"redis_sentinels": "sentinel-0"}, "is not `host:port`"),
        ({"redis_sentinels": "sentinel-0:0"}, "is not `host:port`"),
        ({"redis_sentinels": "sentinel-0:http"}, "is not `host:port`"),
        ({"redis_sentinels": "sentinel-0:26379"}, "go together"),
        ({"redis_sentinel_master": "do2"}, "go together"),
        (
            {"redis_sentinels": "s:26379", "redis_sentinel_master": "do2", "redis_url": "rediss://:p@/0"},
            "TLS and sockets are not supported",
        ),
        (
            {"redis_sentinels": "s:26379", "redis_sentinel_master": "do2", "redis_url": "redis:///zero"},
            "must be a number",
        ),
    ],
)
def test_a_sentinel_setting_that_cannot_work_is_refused_at_start(
    environ: pytest.MonkeyPatch, env: dict[str, str], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        ServiceSettings(**env)


# On a real Sentinel-managed Redis ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sentinel_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelRedis]:
    """Data nodes and sentinels that each ask for a password (the data nodes' needs URL quoting)."""
    group = SentinelRedis(tmp_path_factory.mktemp("sentinel"), password="p@ss:w/rd", sentinel_password="s3nt")
    with group:
        yield group


@pytest.fixture
def sentinel_settings(sentinel_redis: SentinelRedis, environ: pytest.MonkeyPatch) -> ServiceSettings:
    for name, value in sentinel_redis.settings.items():
        environ.setenv(name, value)
    return ServiceSettings(redis_prefix=f"t{uuid.uuid4().hex[:8]}", queue=f"q{uuid.uuid4().hex[:8]}")


def test_the_store_writes_on_the_primary_the_sentinels_name(
    sentinel_redis: SentinelRedis, sentinel_settings: ServiceSettings
) -> None:
    store = Store.from_settings(sentinel_settings)
    store.redis.set(f"{sentinel_settings.redis_prefix}:x", "1")
    primary, replica = sentinel_redis.client("redis-a"), sentinel_redis.client("redis-b")
    assert primary.get(f"{sentinel_settings.redis_prefix}:x") == b"1"
    assert replica.info("replication")["role"] == "slave"


def test_a_bounded_pool_makes_a_caller_wait_for_a_connection(sentinel_settings: ServiceSettings) -> None:
    store = Store.from_settings(sentinel_settings, max_connections=1)
    errors: list[Exception] = []

    def hold() -> None:  # each holds the one connection for 0.5 s
        try:
            store.redis.blpop([f"{sentinel_settings.redis_prefix}:nothing"], timeout=0.5)
        except Exception as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and time.monotonic() - started >= 1.0


def test_the_async_client_reads_from_the_primary(sentinel_settings: ServiceSettings) -> None:
    key = f"{sentinel_settings.redis_prefix}:async"
    Store.from_settings(sentinel_settings).redis.set(key, "there")

    async def read() -> bytes | None:
        client = sentinel_settings.redis_target.async_client()
        try:
            return await client.get(key)
        finally:
            await client.aclose()

    assert asyncio.run(read()) == b"there"


def test_celery_sends_and_lists_messages_through_the_sentinels(sentinel_settings: ServiceSettings) -> None:
    app = create_celery(sentinel_settings)
    enqueue(app, sentinel_settings, "j_through_sentinels")
    assert "j_through_sentinels" in jobs_with_messages(app, sentinel_settings)
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        # The service's own channel (its lost-connection faults kept), finding the primary by name.
        assert isinstance(channel, broker.SentinelChannel) and isinstance(channel.qos, broker.QoS)


def test_a_new_job_reaches_the_replica_before_replicate_returns(sentinel_settings: ServiceSettings) -> None:
    store = Store.from_settings(sentinel_settings)
    job = store.jobs.create(owner="alice", spec=SPEC, images=[b"input"], ttl_s=60)
    assert store.jobs.replicate(job.id, 60, 1, timeout_ms=2000) == 1
    # Two replicas are more than there are: WAIT gives up after its timeout with the one it has.
    started = time.monotonic()
    assert store.jobs.replicate(job.id, 60, 2, timeout_ms=200) == 1
    assert time.monotonic() - started >= 0.2


def test_redis_target_needs_both_sentinels_and_a_master() -> None:
    with pytest.raises(ValueError, match="go together"):
        RedisTarget("redis:///0", sentinels=(("127.0.0.1", 26379),))
    assert not RedisTarget("redis://127.0.0.1:6379/0").uses_sentinel

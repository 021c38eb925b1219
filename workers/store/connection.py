"""How every process reaches Redis: at one URL, or as the primary a group of Redis Sentinels names.

With sentinels, the URL gives only the database number and the credentials; the primary's address
is asked of the sentinels whenever a connection is opened, so after a failover each client's next
connection goes to the new primary, with no restart. The sentinels take a password of their own if
they ask for one (`sentinel_password`).

Every client of the service comes from `RedisTarget` (the job store's, the gateway's async one for
the event streams), and so does Celery's broker connection (`broker_url`, `broker_options`), so all
of them follow the same primary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

#: Options of every connection: idle connections are checked before use, dead peers noticed.
CONNECTION_OPTIONS: dict[str, Any] = {"health_check_interval": 30, "socket_keepalive": True}
#: A sentinel that does not answer this fast is skipped for the next; a primary that does not accept
#: a connection this fast counts as down (its address may be a node that is gone, which never refuses).
SENTINEL_TIMEOUT_S = 2.0
#: How long a caller waits for a free connection of a bounded pool before failing.
POOL_WAIT_S = 10


class BlockingSentinelConnectionPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """The Sentinel pool with `BlockingConnectionPool`'s bound: a caller beyond `max_connections` waits
    up to `timeout` seconds for a connection instead of failing with "Too many connections"."""


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is: `url`, or, with `sentinels` (`(host, port)` pairs), the primary they know as
    `master`, with the database number and credentials of `url` (`sentinel_password`: the sentinels')."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    sentinel_password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if bool(self.sentinels) != bool(self.master):
            raise ValueError(
                "DREAMOMNI2_REDIS_SENTINELS and DREAMOMNI2_REDIS_SENTINEL_MASTER go together: set both "
                "(the sentinels' `host:port` list and the name they monitor the primary by) or neither"
            )
        if self.sentinels:
            self.credentials()  # refuse a URL the sentinel clients could not use, at start

    @property
    def uses_sentinel(self) -> bool:
        return bool(self.sentinels)

    def credentials(self) -> dict[str, Any]:
        """What `url` gives besides an address: `db`, and `username` and `password` where set."""
        parts = urlsplit(self.url)
        if parts.scheme != "redis":
            raise ValueError(
                f"with sentinels DREAMOMNI2_REDIS_URL must be redis://[:password@]/db (got scheme "
                f"{parts.scheme!r}: TLS and sockets are not supported through sentinels)"
            )
        path = parts.path.strip("/") or "0"
        if not path.isdigit():
            raise ValueError(f"the database of DREAMOMNI2_REDIS_URL must be a number, got {path!r}")
        found: dict[str, Any] = {"db": int(path)}
        if parts.username:
            found["username"] = unquote(parts.username)
        if parts.password:
            found["password"] = unquote(parts.password)
        return found

    # Clients ----------------------------------------------------------------------------------------
    def client(self, max_connections: int | None = None) -> redis.Redis:
        """A client on the primary. With `max_connections`, a caller beyond that many waits for a
        connection (up to `POOL_WAIT_S`) instead of failing with "Too many connections"."""
        if not self.sentinels:
            if max_connections is None:
                return redis.Redis.from_url(self.url, **CONNECTION_OPTIONS)
            pool = redis.BlockingConnectionPool.from_url(
                self.url, max_connections=max_connections, timeout=POOL_WAIT_S, **CONNECTION_OPTIONS
            )
            return redis.Redis(connection_pool=pool)
        bounded: dict[str, Any] = {}
        pool_class: type[redis.sentinel.SentinelConnectionPool] = redis.sentinel.SentinelConnectionPool
        if max_connections is not None:
            pool_class = BlockingSentinelConnectionPool
            bounded = {"max_connections": max_connections, "timeout": POOL_WAIT_S}
        sentinel = redis.sentinel.Sentinel(list(self.sentinels), sentinel_kwargs=self._sentinel_options())
        return sentinel.master_for(
            self.master,
            redis_class=redis.Redis,
            connection_pool_class=pool_class,
            socket_connect_timeout=SENTINEL_TIMEOUT_S,
            **CONNECTION_OPTIONS,
            **self.credentials(),
            **bounded,
        )

    def async_client(self) -> redis.asyncio.Redis:
        """An asyncio client on the primary (the gateway's event streams)."""
        if not self.sentinels:
            return redis.asyncio.Redis.from_url(self.url, health_check_interval=30)
        sentinel = redis.asyncio.sentinel.Sentinel(
            list(self.sentinels), sentinel_kwargs=self._sentinel_options()
        )
        return sentinel.master_for(
            self.master,
            redis_class=redis.asyncio.Redis,
            socket_connect_timeout=SENTINEL_TIMEOUT_S,
            health_check_interval=30,
            **self.credentials(),
        )

    def _sentinel_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        }
        if self.sentinel_password:
            options["password"] = self.sentinel_password
        return options

    # Celery's broker ----------------------------------------------------------------------------------
    @property
    def broker_url(self) -> str:
        """Kombu's broker URL: `url` itself, or one `sentinel://` URL per sentinel, `;`-separated,
        each with the credentials and database (Kombu asks them in turn for the primary)."""
        if not self.sentinels:
            return self.url
        credentials = self.credentials()
        userinfo = ""
        if "username" in credentials or "password" in credentials:
            userinfo = quote(credentials.get("username", ""), safe="")
            if "password" in credentials:
                userinfo += ":" + quote(credentials["password"], safe="")
            userinfo += "@"
        hosts = [f"[{host}]" if ":" in host else host for host, _ in self.sentinels]
        return ";".join(
            f"sentinel://{userinfo}{host}:{port}/{credentials['db']}"
            for host, (_, port) in zip(hosts, self.sentinels, strict=True)
        )

    @property
    def broker_options(self) -> dict[str, Any]:
        """Kombu transport options the target needs (the master's name, the sentinels' timeouts)."""
        if not self.sentinels:
            return {}
        return {"master_name": self.master, "sentinel_kwargs": self._sentinel_options()}

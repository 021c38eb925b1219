"""Kombu's Redis transport, with its faults around a lost connection kept from stopping a worker.

When Redis drops while a consumer holds unacknowledged messages (a GPU worker's job, a webhook
worker's attempts in flight), Kombu closes the channel and tries to put those messages back first;
the connection is already gone, and `restore_unacked` fails with an AttributeError (`'NoneType'
object has no attribute 'hostname'`) that Celery takes as unrecoverable: the worker exits, with status
0. Here that is what it is, a connection error: the messages stay in Redis's unacked set (Kombu hands
them out again after that app's visibility timeout) and the worker reconnects as it does for any
other connection loss. Likewise a message acknowledged (or rejected) after its channel closed: see
`QoS._closed`.
"""

from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis

logger = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    def restore_unacked(self, client: object = None) -> None:
        try:
            super().restore_unacked(client)
        except AttributeError as exc:  # the connection went away under the restore (see above)
            logger.warning("Redis dropped: unacknowledged messages stay for redelivery (%s)", exc)

    def ack(self, delivery_tag: str) -> None:
        if not self._closed("acknowledged"):
            super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not self._closed("rejected"):
            super().reject(delivery_tag, requeue=requeue)

    def _closed(self, what: str) -> bool:
        """Whether this channel is gone: a task that ran across a reconnection ends on the old channel,
        whose connection is None (Kombu would raise an AttributeError, which Celery takes as
        unrecoverable: the consumer stops for good while the process lives on). Its message stays in
        the unacked set and is handed out again after the visibility timeout; the job store makes a
        second run harmless (run tokens; a webhook attempt already recorded is not sent again)."""
        if self.channel.closed or self.channel.connection is None:
            logger.warning(
                "a message %s after its channel closed (Redis reconnected); redelivered later", what
            )
            return True
        return False


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


#: `broker_transport` of every Celery app of the service.
TRANSPORT = f"{__name__}:Transport"


class SentinelChannel(kombu_redis.SentinelChannel):
    QoS = QoS


class SentinelTransport(kombu_redis.SentinelTransport):
    """The same, for a Sentinel-managed Redis (`sentinel://` broker URLs)."""

    Channel = SentinelChannel


#: `broker_transport` with `DREAMOMNI2_REDIS_SENTINELS` set.
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"

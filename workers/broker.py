"""Kombu's Redis transport, with one fault of its own kept from stopping a worker.

When Redis drops while a consumer holds unacknowledged messages (a GPU worker's job, a webhook
worker's attempts in flight), Kombu closes the channel and tries to put those messages back first;
the connection is already gone, and `restore_unacked` fails with an AttributeError (`'NoneType'
object has no attribute 'hostname'`) that Celery takes as unrecoverable: the worker exits, with status
0. Here that is what it is, a connection error: the messages stay in Redis's unacked set (Kombu hands
them out again after that app's visibility timeout) and the worker reconnects as it does for any
other connection loss.
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


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


#: `broker_transport` of every Celery app of the service.
TRANSPORT = f"{__name__}:Transport"

"""Signed webhooks (Standard Webhooks): destination checks, signing, delivery with retries.

Deliveries run on a Celery queue of their own, consumed by `python -m workers.webhooks` (no models,
many threads), so a GPU worker only enqueues a delivery id and never waits on a slow receiver.
Every attempt of a delivery sends the same body under the same `webhook-id`, signed afresh with the
attempt's timestamp, as the specification asks.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from celery import Celery
from standardwebhooks import Webhook

from api_schemas.api import JobStatus
from api_schemas.errors import InvalidInput
from workers.config import ServiceSettings
from workers.store import JobRecord, JobStore
from workers.views import job_view

logger = logging.getLogger(__name__)

DELIVER_TASK = "dreamomni2.deliver_webhook"
USER_AGENT = "DreamOmni2-Serve-Webhooks/1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookEvent(StrEnum):
    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"


@dataclass(frozen=True)
class Allowlist:
    """Hosts and networks admitted although they are private (`DREAMOMNI2_WEBHOOK_ALLOWLIST`)."""

    hosts: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, text: str) -> Allowlist:
        hosts, networks = set(), []
        for item in filter(None, (part.strip() for part in text.split(","))):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def admits(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


def refused_reason(address: IPAddress) -> str | None:
    """Why a destination address is refused, or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (cloud metadata lives here)"
    if address.is_unspecified:
        return "unspecified"
    if address.is_private:
        return "private"
    if address.is_multicast or address.is_reserved or not address.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class Destination:
    """A checked webhook URL and the addresses it may be delivered to."""

    url: str
    host: str
    addresses: tuple[IPAddress, ...]


def _refuse(url: str, why: str, **details: Any) -> InvalidInput:
    return InvalidInput(
        f"webhook_url {url!r} is refused: {why}.",
        code="webhook_url_refused",
        details={"webhook_url": url, **details},
    )


def check_destination(url: str, allowlist: Allowlist, resolve=socket.getaddrinfo) -> Destination:
    """Refuse URLs that are not http(s) or resolve to a non-public address outside the allowlist.

    Called at submit (a 422 for the caller) and again before every delivery attempt, because what a
    name resolves to can change in between.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _refuse(url, "it must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise _refuse(url, "credentials in the URL are not allowed; authenticate with the signature")
    host = parts.hostname.lower().rstrip(".")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise _refuse(url, "the port is not a number from 1 to 65535") from None
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _refuse(url, f"the host {host!r} does not resolve ({exc})") from None
    addresses = tuple(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not addresses:
        raise _refuse(url, f"the host {host!r} does not resolve")
    if host not in allowlist.hosts:
        for address in addresses:
            reason = refused_reason(address)
            if reason and not allowlist.admits(address):
                where = f"{address} is" if host == str(address) else f"{host} resolves to {address},"
                raise _refuse(
                    url,
                    f"{where} a {reason} address; only public destinations are allowed unless "
                    "DREAMOMNI2_WEBHOOK_ALLOWLIST admits it",
                    address=str(address),
                )
    return Destination(url=url, host=host, addresses=addresses)


def pinned_request_url(destination: Destination) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Connect to the checked address itself (no second DNS lookup), keeping Host and TLS name."""
    parts = urlsplit(destination.url)
    address = destination.addresses[0]
    literal = f"[{address}]" if address.version == 6 else str(address)
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    host_header = destination.host if parts.port is None else f"{destination.host}:{parts.port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    extensions = {"sni_hostname": destination.host} if parts.scheme == "https" else {}
    return pinned, {"Host": host_header}, extensions


def signed_headers(secret: str, delivery_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt."""
    now = now or datetime.now(tz=UTC)
    return {
        "webhook-id": delivery_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(delivery_id, now, body),
    }


@dataclass(frozen=True)
class AttemptOutcome:
    delivered: bool
    status_code: int | None
    error: str | None


def attempt_delivery(
    url: str, body: str, delivery_id: str, secret: str, allowlist: Allowlist, timeout_s: float
) -> AttemptOutcome:
    """One POST of the body: 2xx is delivered; anything else, a redirect included, is a failure."""
    try:
        destination = check_destination(url, allowlist)
    except InvalidInput as exc:
        return AttemptOutcome(False, None, exc.message)
    pinned, headers, extensions = pinned_request_url(destination)
    headers |= signed_headers(secret, delivery_id, body)
    headers |= {"content-type": "application/json", "user-agent": USER_AGENT}
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
            response = client.post(pinned, content=body.encode(), headers=headers, extensions=extensions)
    except httpx.HTTPError as exc:
        return AttemptOutcome(False, None, f"{type(exc).__name__}: {exc}")
    if 200 <= response.status_code < 300:
        return AttemptOutcome(True, response.status_code, None)
    reason = "redirects are not followed" if response.is_redirect else "non-2xx answer"
    return AttemptOutcome(False, response.status_code, f"HTTP {response.status_code} ({reason})")


def parse_secrets(entries: str) -> dict[str, str]:
    """`name:whsec_...,name2:whsec_...` -> {owner name: secret}."""
    secrets: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in entries.split(","))):
        name, _, secret = entry.partition(":")
        if not secret.startswith("whsec_"):
            raise ValueError(f"DREAMOMNI2_WEBHOOK_SECRETS entry for {name!r} is not `name:whsec_...`.")
        Webhook(secret)  # refuses a secret that is not base64
        secrets[name.strip()] = secret.strip()
    return secrets


class Notifier:
    """Turns job events into webhook deliveries: a stored snapshot of the job object plus a message."""

    def __init__(self, store: JobStore, celery: Celery, settings: ServiceSettings):
        self.store = store
        self.celery = celery
        self.settings = settings

    def wants(self, record: JobRecord, event: WebhookEvent) -> bool:
        hook = record.spec.get("webhook")
        return bool(hook) and event.value in hook["events"]

    def notify(self, job_id: str, event: WebhookEvent) -> str | None:
        """Queue a delivery of the job object as it is now; returns the delivery id, if any."""
        try:
            record = self.store.get(job_id)
        except Exception:
            return None
        if not self.wants(record, event):
            return None
        position = self.store.queue_position(job_id) if record.status is JobStatus.QUEUED else None
        body = job_view(record, position).model_dump_json(by_alias=True)
        delivery_id = f"msg_{uuid.uuid4().hex}"
        self.store.create_delivery(
            delivery_id,
            job_id=job_id,
            owner=record.owner,
            url=record.spec["webhook"]["url"],
            event=event.value,
            body=body,
            ttl_s=record.ttl_s,
        )
        try:
            self.celery.send_task(DELIVER_TASK, args=[delivery_id], queue=self.settings.webhook_queue)
        except Exception:
            logger.exception("could not queue webhook %s for job %s", delivery_id, job_id)
        return delivery_id


def backoff_s(attempt: int, first_s: float) -> float:
    """Delay before attempt `attempt + 1`: the first delay, doubling (30 s, 1 min, 2 min, ...)."""
    return first_s * 2 ** (attempt - 1)


def total_schedule_s(attempts: int, first_s: float) -> float:
    return sum(backoff_s(n, first_s) for n in range(1, attempts))


class WebhookDeliverer:
    """The Celery task body of the webhook queue."""

    def __init__(self, store: JobStore, settings: ServiceSettings):
        self.store = store
        self.settings = settings
        self.allowlist = Allowlist.parse(settings.webhook_allowlist)
        self.secrets = parse_secrets(settings.webhook_secrets)

    def secret_for(self, owner: str) -> str | None:
        return self.secrets.get(owner) or self.settings.webhook_secret or None

    def deliver(self, delivery_id: str) -> float | None:
        """Make one attempt; returns the delay before the next one, or None when done."""
        delivery = self.store.delivery(delivery_id)
        if delivery is None:
            logger.warning("webhook %s expired before delivery", delivery_id)
            return None
        secret = self.secret_for(delivery["owner"])
        attempt = int(delivery["attempts"]) + 1
        if secret is None:
            outcome = AttemptOutcome(False, None, "no webhook secret is configured for this key")
        else:
            timeout = self.settings.webhook_timeout_s
            url, body = delivery["url"], delivery["body"]
            outcome = attempt_delivery(url, body, delivery_id, secret, self.allowlist, timeout)
        final = outcome.delivered or attempt >= self.settings.webhook_max_attempts or secret is None
        status = "delivered" if outcome.delivered else ("failed" if final else "retrying")
        self.store.record_delivery_attempt(
            delivery_id,
            delivery["job_id"],
            {
                "id": delivery_id,
                "event": delivery["event"],
                "status": status,
                "attempts": attempt,
                "status_code": outcome.status_code,
                "error": outcome.error,
                "at": datetime.now(tz=UTC).isoformat(),
            },
        )
        if final:
            log = logger.info if outcome.delivered else logger.warning
            job_id = delivery["job_id"]
            log("webhook %s for job %s: %s after %d attempt(s)", delivery_id, job_id, status, attempt)
            return None
        # A retry waits inside the worker as an unacknowledged message; past the broker's visibility
        # timeout Redis would hand it out a second time, so no wait may reach it.
        return min(
            backoff_s(attempt, self.settings.webhook_backoff_s), 0.9 * self.settings.visibility_timeout_s
        )


def create_webhook_celery(settings: ServiceSettings) -> tuple[Celery, WebhookDeliverer]:
    from workers.celery_app import create_celery

    app = create_celery(settings)
    store = JobStore.from_url(settings.redis_url, settings.redis_prefix)
    deliverer = WebhookDeliverer(store, settings)

    @app.task(name=DELIVER_TASK, bind=True, acks_late=True, max_retries=None)
    def deliver_webhook(task, delivery_id: str) -> None:
        delay = deliverer.deliver(delivery_id)
        if delay is not None:
            raise task.retry(countdown=delay)

    return app, deliverer


def main(argv: Iterable[str] = ()) -> int:
    """`python -m workers.webhooks`: consume the webhook queue with many threads (I/O bound)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServiceSettings()
    app, _ = create_webhook_celery(settings)
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.webhook_concurrency}",
            f"--queues={settings.webhook_queue}",
            "--hostname=webhooks@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
            *argv,
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Webhook destinations: only public http(s) addresses, unless the deployment's allowlist admits one.

Checked when a job is submitted (a 422 for the caller) and again before every delivery attempt,
because what a name resolves to can change in between; the request then goes to the checked address
itself, so a second DNS answer cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from api_schemas.errors import ErrorCode, InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Allowlist:
    """Hosts and networks admitted although they are private (`DREAMOMNI2_WEBHOOK_ALLOWLIST`)."""

    hosts: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def empty(cls) -> Allowlist:
        return cls(frozenset(), ())

    @classmethod
    def parse(cls, text: str) -> Allowlist:
        """Comma-separated items, each a CIDR (or an address), else a host name."""
        hosts, networks = set(), []
        for item in filter(None, (part.strip() for part in text.split(","))):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def admits(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


#: NAT64's well-known prefix: the last 32 bits are an IPv4 address the translator connects to.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo client, NAT64), which is where
    a packet to it ends up; None when it carries none."""
    if address.ipv4_mapped:
        return address.ipv4_mapped
    if address.sixtofour:
        return address.sixtofour
    if address.teredo:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refused_reason(address: IPAddress) -> str | None:
    """Why a destination address is refused, or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:  # fec0::/10: deprecated, but routed inside sites
            return "site-local"
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = refused_reason(embedded)
            return f"{reason} (embedded {embedded})" if reason else None
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
        code=ErrorCode.WEBHOOK_URL_REFUSED,
        details={"webhook_url": url, **details},
    )


def check_destination(
    url: str, allowlist: Allowlist, resolve: Callable[..., list] = socket.getaddrinfo
) -> Destination:
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

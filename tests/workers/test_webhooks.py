"""Webhook destinations, signatures and single delivery attempts against a real loopback receiver."""

from __future__ import annotations

import http.server
import ipaddress
import json
import socket
import threading
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from api_schemas.errors import InvalidInput
from workers.config import ServiceSettings, parse_webhook_secrets
from workers.destinations import Allowlist, check_destination, pinned_request_url
from workers.webhooks import attempt_delivery, backoff_s, signed_headers, total_schedule_s

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NOBODY = Allowlist.parse("")


def resolver(*addresses: str):
    def resolve(host, port, type=0):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, type, 6, "", (a, port)) for a in addresses]

    return resolve


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("192.168.1.20", "private"),
        ("172.16.5.4", "private"),
        ("169.254.169.254", "link-local"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("fd00:ec2::254", "private"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "not a public"),
        ("224.0.0.1", "not a public"),
        # IPv6 forms that deliver to an embedded IPv4 address: 6to4, Teredo, NAT64.
        ("2002:7f00:1::", "loopback (embedded 127.0.0.1)"),
        ("2002:a9fe:a9fe::", "link-local (cloud metadata lives here) (embedded 169.254.169.254)"),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private (embedded 10.0.0.1)"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("fec0::1", "site-local"),
    ],
)
def test_non_public_destinations_are_refused(address, words):
    with pytest.raises(InvalidInput) as info:
        check_destination("https://hooks.example.com/x", NOBODY, resolve=resolver(address))
    assert info.value.code == "webhook_url_refused"
    assert words in info.value.message and str(ipaddress.ip_address(address)) in info.value.message
    assert "DREAMOMNI2_WEBHOOK_ALLOWLIST" in info.value.message


def test_one_bad_address_among_good_ones_is_enough_to_refuse():
    with pytest.raises(InvalidInput):
        check_destination("https://x.example/", NOBODY, resolve=resolver("93.184.216.34", "10.1.1.1"))


def test_a_name_resolving_to_loopback_is_refused():
    with pytest.raises(InvalidInput) as info:
        check_destination("http://localhost:9999/hook", NOBODY)
    assert "loopback" in info.value.message


def test_public_addresses_behind_6to4_and_nat64_pass():
    for address in ("2002:5db8:d822::1", "64:ff9b::5db8:d822"):  # 93.184.216.34 inside
        assert check_destination("https://h.example/", NOBODY, resolve=resolver(address)).addresses


def test_public_destinations_pass():
    destination = check_destination(
        "https://hooks.example.com/a?b=1", NOBODY, resolve=resolver("93.184.216.34")
    )
    assert destination.host == "hooks.example.com"
    assert [str(a) for a in destination.addresses] == ["93.184.216.34"]


def test_allowlist_admits_hosts_and_networks():
    allow = Allowlist.parse("receiver.internal, 10.20.0.0/16, ::1")
    check_destination("http://receiver.internal/", allow, resolve=resolver("10.9.9.9"))
    check_destination("http://x.example/", allow, resolve=resolver("10.20.3.4"))
    check_destination("http://[::1]:8080/", allow)
    with pytest.raises(InvalidInput):
        check_destination("http://x.example/", allow, resolve=resolver("10.21.0.1"))


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "example.com/hook",
        "https://user:pw@example.com/",
        "http://",
        "https://e.com:99999/",
    ],
)
def test_malformed_urls_are_refused(url):
    with pytest.raises(InvalidInput):
        check_destination(url, NOBODY, resolve=resolver("93.184.216.34"))


def test_unresolvable_host_is_refused():
    def fail(*args: object, **kwargs: object):
        raise socket.gaierror(-2, "Name or service not known")

    with pytest.raises(InvalidInput) as info:
        check_destination("https://nowhere.invalid/", NOBODY, resolve=fail)
    assert "does not resolve" in info.value.message


def test_requests_are_pinned_to_the_checked_address():
    d = check_destination("https://hooks.example.com:8443/p?q=1", NOBODY, resolve=resolver("93.184.216.34"))
    url, headers, extensions = pinned_request_url(d)
    assert url == "https://93.184.216.34:8443/p?q=1"
    assert headers == {"Host": "hooks.example.com:8443"} and extensions == {
        "sni_hostname": "hooks.example.com"
    }
    d6 = check_destination("http://h.example/", NOBODY, resolve=resolver("2606:2800:220:1::1"))
    assert pinned_request_url(d6)[0] == "http://[2606:2800:220:1::1]/"


def test_signatures_verify_with_the_standardwebhooks_library():
    body = json.dumps({"id": "j_1", "status": "succeeded"})
    headers = signed_headers(SECRET, "msg_1", body, datetime.now(tz=UTC))
    assert Webhook(SECRET).verify(body, headers) == {"id": "j_1", "status": "succeeded"}
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "b3RoZXJzZWNyZXRvdGhlcnNlY3JldA==").verify(body, headers)


def test_retry_schedule_is_about_an_hour():
    assert [backoff_s(n, 30) for n in (1, 2, 3)] == [30, 60, 120]
    assert 50 * 60 < total_schedule_s(8, 30) < 70 * 60


def test_secret_entries():
    assert parse_webhook_secrets(f"alice:{SECRET}") == {"alice": SECRET}
    with pytest.raises(ValueError):
        parse_webhook_secrets("alice:plain")


def test_webhook_settings_are_parsed_once_and_refused_at_start(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("DREAMOMNI2_WEBHOOK_SECRETS", f"alice:{SECRET}, bob:{SECRET}")
    monkeypatch.setenv("DREAMOMNI2_WEBHOOK_ALLOWLIST", "receiver.internal, 10.0.0.0/8")
    settings = ServiceSettings()
    assert settings.webhook_secrets == {"alice": SECRET, "bob": SECRET}
    assert settings.webhook_allowlist.hosts == {"receiver.internal"}
    assert settings.webhook_allowlist.admits(ipaddress.ip_address("10.1.2.3"))
    monkeypatch.setenv("DREAMOMNI2_WEBHOOK_SECRETS", "alice:plain")
    with pytest.raises(ValidationError, match="webhook_secrets"):
        ServiceSettings()
    monkeypatch.delenv("DREAMOMNI2_WEBHOOK_SECRETS")
    monkeypatch.setenv("DREAMOMNI2_WEBHOOK_SECRET", "not-a-secret")
    with pytest.raises(ValidationError, match="webhook_secret"):
        ServiceSettings()


class Receiver(http.server.BaseHTTPRequestHandler):
    answers: list[int] = []
    seen: list[tuple[dict, bytes]] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["content-length"]))
        Receiver.seen.append((dict(self.headers), body))
        status = Receiver.answers.pop(0) if Receiver.answers else 204
        self.send_response(status)
        if status in (301, 302, 307):
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object):
        pass


@pytest.fixture
def receiver():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Receiver.answers, Receiver.seen = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def test_attempts_post_signed_bodies_and_never_follow_redirects(receiver):
    allow = Allowlist.parse("127.0.0.1")
    Receiver.answers = [500, 307, 204]
    outcomes = [attempt_delivery(receiver, '{"id": "j_1"}', "msg_7", SECRET, allow, 5) for _ in range(3)]
    assert [(o.delivered, o.status_code) for o in outcomes] == [(False, 500), (False, 307), (True, 204)]
    assert "redirects are not followed" in outcomes[1].error
    assert len(Receiver.seen) == 3  # the redirect target was never asked
    for headers, body in Receiver.seen:
        assert headers["webhook-id"] == "msg_7"
        Webhook(SECRET).verify(body, {k.lower(): v for k, v in headers.items()})


def test_a_refused_destination_is_not_contacted(receiver):
    outcome = attempt_delivery(receiver, "{}", "msg_8", SECRET, NOBODY, 5)
    assert not outcome.delivered and "loopback" in outcome.error
    assert Receiver.seen == []

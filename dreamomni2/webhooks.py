"""Verify the service's webhook deliveries (Standard Webhooks signatures) and read the job they carry."""

from __future__ import annotations

import binascii
from collections.abc import Mapping

from pydantic import ValidationError
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as _LibraryVerificationError

from api_schemas.api import Job
from dreamomni2.errors import WebhookVerificationError


def verify_webhook(payload: bytes | str, headers: Mapping[str, str], secret: str) -> Job:
    """Check a webhook delivery and return the job object it carries.

    Args:
        payload: the request body exactly as received (bytes, or text decoded as UTF-8); re-encoding
            parsed JSON changes the bytes and fails the check.
        headers: the request's headers (any mapping; names in any case): `webhook-id`,
            `webhook-timestamp` and `webhook-signature` are read.
        secret: the `whsec_...` secret the service signs this API key's webhooks with.

    Raises:
        WebhookVerificationError: a header is missing or malformed, no signature matches the body,
            or the timestamp is more than 5 minutes from now (a replayed delivery).
        ValueError: `secret` is not a `whsec_` base64 secret.

    Deliveries are retried under the same `webhook-id`: deduplicate on `headers["webhook-id"]`.
    """
    try:
        webhook = Webhook(secret)
    except (binascii.Error, ValueError, RuntimeError) as exc:
        raise ValueError(f"Not a webhook secret (expected whsec_ and base64): {exc}") from None
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        body = webhook.verify(payload, lowered)
    except _LibraryVerificationError as exc:
        raise WebhookVerificationError(f"The webhook does not verify: {exc}.") from None
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        # A signature header the library cannot even split or decode, or a body that is not UTF-8.
        raise WebhookVerificationError(f"The webhook's signature headers are malformed: {exc}.") from None
    try:
        return Job.model_validate(body)
    except ValidationError as exc:
        raise WebhookVerificationError(
            f"The webhook verifies, but its body is not a job object: {exc}"
        ) from None

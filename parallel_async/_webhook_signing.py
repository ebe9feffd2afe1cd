"""Signed webhook deliveries for tests: the body (`event_payload`) and its headers (`sign`).

They follow the same convention `verify` checks (see ``_webhooks``), so a test can POST real
deliveries, or tampered ones, to a receiver.
"""

from __future__ import annotations

import base64
import hmac
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import msgspec

from ._errors import WebhookVerificationError
from ._models import TaskRun
from ._webhooks import TASK_RUN_STATUS, Secret, parse_secrets

__all__ = ["event_payload", "sign"]

_ENCODER = msgspec.json.Encoder()


def event_payload(
    data: TaskRun | Mapping[str, Any],
    *,
    type: str = TASK_RUN_STATUS,
    timestamp: str | None = None,
) -> bytes:
    """The body of a delivery: ``{"timestamp", "type", "data"}`` as JSON bytes.

    ``timestamp`` defaults to now, in RFC 3339 with microseconds like the API's.
    """
    if timestamp is None:
        timestamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return _ENCODER.encode({"timestamp": timestamp, "type": type, "data": data})


def sign(
    payload: bytes,
    secret: Secret,
    *,
    webhook_id: str | None = None,
    timestamp: int | float | None = None,
) -> dict[str, str]:
    """The headers of a signed delivery of ``payload``: for tests of your receiver.

        body = event_payload(run)
        headers = sign(body, "my-secret")
        async with session.post(url, data=body, headers=headers) as resp: ...

    Args:
        payload: the body to sign (see `event_payload`).
        secret: as for `verify`; with several secrets, one signature per secret.
        webhook_id: the ``webhook-id``; default a fresh ``whevent_...`` id.
        timestamp: unix seconds for ``webhook-timestamp``; default now.

    Returns:
        ``webhook-id``, ``webhook-timestamp``, ``webhook-signature`` and ``content-type``.
    """
    keys = parse_secrets(secret, WebhookVerificationError)
    webhook_id = webhook_id if webhook_id is not None else f"whevent_{uuid.uuid4().hex}"
    stamp = str(int(time.time() if timestamp is None else timestamp))
    signed = b"%s.%s.%s" % (webhook_id.encode(), stamp.encode(), bytes(payload))
    signatures = " ".join(
        "v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode() for key in keys
    )
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": stamp,
        "webhook-signature": signatures,
        "content-type": "application/json",
    }

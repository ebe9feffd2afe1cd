"""Webhook deliveries of the fake: signed POSTs to a run's webhook URL when the run ends.

As the API does (reference §12): when a run created with a ``webhook`` reaches ``completed``,
``failed`` or ``cancelled``, its status is POSTed as ``{"timestamp", "type": "task_run.status",
"data": <TaskRun>}`` with the Standard Webhooks headers ``webhook-id``, ``webhook-timestamp``
and ``webhook-signature`` (``v1,<base64 HMAC-SHA256>``, one per secret). A non-2xx answer (or
none) is retried after each of ``retry_delays`` (the API: 5 s, doubling, for up to 48 h), with
the same ``webhook-id`` and a fresh timestamp and signature each time.

Faults, drawn once per delivery from ``fake.faults`` under the name ``"webhook"`` (``"*"``
entries do not apply: a delivery is not a request to the API):
``Fault.drop()`` loses the delivery (nothing is ever sent), ``Fault.duplicate()`` sends it
twice, ``Fault.slow(seconds)`` sends it that late. Other kinds have no effect here.

The signing is written here from the reference, not imported from the client, so a bug in the
client's verification cannot hide behind the same bug in the fake.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import aiohttp

from ._wire import encode, rfc3339

if TYPE_CHECKING:
    from ._faults import Fault, FaultInjector
    from ._state import RunRecord

__all__ = [
    "API_RETRY_DELAYS",
    "DEFAULT_WEBHOOK_SECRET",
    "WebhookDelivery",
    "WebhookSender",
    "signing_keys",
]

DEFAULT_WEBHOOK_SECRET = "test-webhook-secret"  # noqa: S105 - the fake's, like "test-key"


def _api_schedule(first: float = 5.0, horizon: float = 48 * 3600.0) -> tuple[float, ...]:
    delays, total, delay = [], 0.0, first
    while total + delay <= horizon:
        delays.append(delay)
        total += delay
        delay *= 2
    return tuple(delays)


API_RETRY_DELAYS: tuple[float, ...] = _api_schedule()
"""The API's retry delays, seconds: 5, 10, 20, ... while the total stays within 48 hours."""

DeliveryState = Literal["pending", "delivered", "failed", "lost"]


def signing_keys(secret: str | Sequence[str]) -> tuple[bytes, ...]:
    """HMAC keys of a secret (or several): ``whsec_`` + base64, else the string's bytes."""
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not secrets:
        raise ValueError("webhook_secret needs at least one secret")
    keys = []
    for item in secrets:
        if not isinstance(item, str) or not item:
            raise ValueError("each webhook secret must be a non-empty string")
        if item.startswith("whsec_"):
            rest = item[len("whsec_") :]
            try:
                key = base64.b64decode(rest + "=" * (-len(rest) % 4), validate=True)
            except binascii.Error:
                raise ValueError("a 'whsec_' webhook secret must be base64 after it") from None
        else:
            key = item.encode()
        if not key:
            raise ValueError("a webhook secret must not be empty")
        keys.append(key)
    return tuple(keys)


@dataclass
class WebhookDelivery:
    """One event the fake delivers (or tried to).

    Attributes:
        webhook_id: The ``webhook-id``, the same on every attempt.
        run_id: The run whose end this reports.
        url: Where it is POSTed (the run's ``webhook.url``).
        body: The JSON body, the same on every attempt.
        fault: The fault drawn for it (``"drop"``, ``"duplicate"``, ``"slow"``) or ``None``.
        state: ``pending``, ``delivered`` (a 2xx came back), ``failed`` (retries exhausted)
            or ``lost`` (a ``drop`` fault: never sent).
        attempts: Per POST, in order: the HTTP status, or the name of the error (no answer).
    """

    webhook_id: str
    run_id: str
    url: str
    body: bytes
    fault: str | None = None
    state: DeliveryState = "pending"
    attempts: list[int | str] = field(default_factory=list)


class WebhookSender:
    """Sends the fake's webhooks (``fake.webhooks``).

    Attributes:
        secret: The secret(s) deliveries are signed with (settable).
        retry_delays: Seconds between attempts after a non-2xx answer or none (settable).
        timeout: Seconds one attempt may take before it counts as unanswered.
        timestamp_offset: Seconds added to ``webhook-timestamp`` (e.g. ``-600`` to send stale
            deliveries and test a receiver's tolerance).
        deliveries: Every delivery so far, in the order runs ended.
    """

    def __init__(
        self,
        faults: FaultInjector,
        *,
        secret: str | Sequence[str] = DEFAULT_WEBHOOK_SECRET,
        retry_delays: Sequence[float] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._faults = faults
        self.secret = secret
        self.retry_delays = API_RETRY_DELAYS if retry_delays is None else tuple(retry_delays)
        if any(not d >= 0 for d in self.retry_delays):
            raise ValueError("webhook retry delays must be >= 0")
        if not timeout > 0:
            raise ValueError(f"webhook timeout must be > 0, not {timeout!r}")
        self.timeout = timeout
        self.timestamp_offset = 0.0
        self.deliveries: list[WebhookDelivery] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._held = False
        self._released: asyncio.Future[None] | None = None

    @property
    def secret(self) -> str | Sequence[str]:
        """The secret(s) deliveries are signed with."""
        return self._secret

    @secret.setter
    def secret(self, value: str | Sequence[str]) -> None:
        self._keys = signing_keys(value)
        self._secret = value

    def __repr__(self) -> str:
        return f"WebhookSender(deliveries={len(self.deliveries)}, pending={self.pending})"

    # --- counters -------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Deliveries not finished yet (waiting, retrying, held or late)."""
        return len(self._tasks)

    @property
    def sent(self) -> int:
        """POSTs made so far, retries and duplicates included."""
        return sum(len(d.attempts) for d in self.deliveries)

    def count(self, state: DeliveryState) -> int:
        """Deliveries in ``state`` (``"delivered"``, ``"failed"``, ``"lost"``, ``"pending"``)."""
        return sum(d.state == state for d in self.deliveries)

    # --- controls -------------------------------------------------------------------------------

    def hold(self) -> None:
        """Hold every attempt (new and retried) until `release`: deliveries made late at will."""
        self._held = True

    def release(self) -> None:
        """Let held attempts go."""
        self._held = False
        released, self._released = self._released, None
        if released is not None and not released.done():
            released.set_result(None)

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until no delivery is pending; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._tasks:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"{len(self._tasks)} webhook deliveries still pending")
            await asyncio.wait(tuple(self._tasks), timeout=left)

    async def aclose(self) -> None:
        """Cancel pending deliveries and close the sending session (the app's cleanup does)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(tuple(self._tasks))
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def cancel_pending(self) -> None:
        """Cancel pending deliveries without waiting (``FakeParallel.close``)."""
        for task in self._tasks:
            task.cancel()

    # --- sending --------------------------------------------------------------------------------

    def run_finished(self, record: RunRecord) -> None:
        """Start delivering ``record``'s final status if it was created with a webhook."""
        webhook = record.input.get("webhook")
        if not isinstance(webhook, dict) or not isinstance(webhook.get("url"), str):
            return
        body = encode(
            {
                "timestamp": rfc3339(record.modified_at),
                "type": "task_run.status",
                "data": record.to_wire(),
            }
        )
        delivery = WebhookDelivery(
            webhook_id=f"whevent_{uuid.uuid4().hex}",
            run_id=record.run_id,
            url=webhook["url"],
            body=body,
        )
        fault = self._faults.draw("webhook", wildcard=False)
        if fault is not None and fault.kind in ("drop", "duplicate", "slow"):
            delivery.fault = fault.kind
        self.deliveries.append(delivery)
        if delivery.fault == "drop":
            delivery.state = "lost"
            return
        task = asyncio.get_running_loop().create_task(self._deliver(delivery, fault))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def headers(self, delivery: WebhookDelivery) -> dict[str, str]:
        """Freshly timestamped and signed headers for one attempt of ``delivery``."""
        stamp = str(int(time.time() + self.timestamp_offset))
        signed = f"{delivery.webhook_id}.{stamp}.".encode() + delivery.body
        signatures = " ".join(
            "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
            for key in self._keys
        )
        return {
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": stamp,
            "webhook-signature": signatures,
            "Content-Type": "application/json",
            "User-Agent": "Parallel-Webhooks (parallel_async.testing fake)",
        }

    async def _gate(self) -> None:
        while self._held:
            if self._released is None:
                self._released = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._released)

    async def _deliver(self, delivery: WebhookDelivery, fault: Fault | None) -> None:
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.seconds)
        delays = iter(self.retry_delays)
        while True:
            await self._gate()
            if await self._post(delivery):
                if delivery.fault == "duplicate":
                    await self._post(delivery)
                delivery.state = "delivered"
                return
            delay = next(delays, None)
            if delay is None:
                delivery.state = "failed"
                return
            await asyncio.sleep(delay)

    async def _post(self, delivery: WebhookDelivery) -> bool:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(
                delivery.url,
                data=delivery.body,
                headers=self.headers(delivery),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            delivery.attempts.append(type(exc).__name__)
            return False
        delivery.attempts.append(resp.status)
        return 200 <= resp.status < 300

"""Webhook deliveries: verification (Standard Webhooks signatures), typed events, a signer, dedup.

A delivery is a POST whose body is ``{"timestamp", "type", "data"}`` and whose headers are
``webhook-id``, ``webhook-timestamp`` (unix seconds) and ``webhook-signature``: space-separated
``v1,<base64>`` entries, each base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>")).

Parallel's own sources disagree on the key: some use the secret string as is, others strip a
``whsec_`` prefix and base64-decode the rest (the Standard Webhooks convention). Both are
accepted: ``whsec_`` means base64 after it, anything else is the raw secret.

Everything here is pure (no I/O) and raises only `WebhookVerificationError` on a delivery, so a
receiver has one thing to catch. The receivers live in ``_webhook_receivers``, the signer for
tests in ``_webhook_signing``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import msgspec

from ._errors import InvalidArgumentError, ParallelError, WebhookVerificationError
from ._models import TaskRun

__all__ = [
    "DEFAULT_TOLERANCE",
    "TASK_RUN_STATUS",
    "WEBHOOK_BETA",
    "Secret",
    "TaskRunStatusEvent",
    "UnknownWebhookEvent",
    "WebhookDeduplicator",
    "WebhookEvent",
    "parse_secrets",
    "verify",
    "verify_with_keys",
    "webhook_betas",
]

WEBHOOK_BETA = "webhook-2025-08-12"
"""The ``parallel-beta`` value that enables ``webhook`` on task runs."""
TASK_RUN_STATUS = "task_run.status"
DEFAULT_TOLERANCE = 300
"""Seconds a delivery's ``webhook-timestamp`` may differ from our clock (either way)."""

_PREFIX = "whsec_"
_MAX_ID = 256
_MAX_TIMESTAMP_DIGITS = 12  # unix seconds until the year 33658: refuses absurd numbers early

Secret: TypeAlias = "str | bytes | Sequence[str | bytes]"  # noqa: S105 - a type
"""A webhook secret (``whsec_<base64>`` or the raw string, or raw bytes), or several of them."""


# --- events -------------------------------------------------------------------------------------


class TaskRunStatusEvent(msgspec.Struct, kw_only=True):
    """A run reached a final status (``task_run.status``): ``data`` is the run, without output.

    Fetch the output with ``client.task_run.result(event.data.run_id)``.
    """

    data: TaskRun
    """The run's status object (``completed``, ``failed`` or ``cancelled``)."""
    timestamp: str
    """RFC 3339 time of the event, from the body."""
    webhook_id: str = ""
    """The delivery's ``webhook-id``: the same on every retry of one event (dedupe on it)."""
    type: Literal["task_run.status"] = "task_run.status"
    """Always ``"task_run.status"``."""


class UnknownWebhookEvent(msgspec.Struct, kw_only=True):
    """A verified event of a type this version does not know, kept whole rather than refused."""

    type: str
    """The event's ``type``."""
    data: Any = None
    """The event's ``data``, as decoded JSON."""
    timestamp: str | None = None
    """RFC 3339 time of the event, if the body has one."""
    webhook_id: str = ""
    """The delivery's ``webhook-id``."""


WebhookEvent: TypeAlias = TaskRunStatusEvent | UnknownWebhookEvent
"""A verified webhook event: ``event.type``, ``event.timestamp``, ``event.data``,
``event.webhook_id``."""


class _StatusBody(msgspec.Struct):
    type: Literal["task_run.status"]  # required: a body without a type is not an event
    timestamp: str
    data: TaskRun


class _Body(msgspec.Struct):
    type: str
    timestamp: Any = None
    data: msgspec.Raw = msgspec.Raw(b"null")


# Decoders built once (msgspec compiles one per type).
_STATUS_BODY = msgspec.json.Decoder(_StatusBody)
_BODY = msgspec.json.Decoder(_Body)
_ANY = msgspec.json.Decoder()


def _decode_event(payload: bytes, webhook_id: str) -> WebhookEvent:
    try:
        # The common case in one pass; any other type, or a body that does not fit, takes
        # the slow path (which words the error).
        body = _STATUS_BODY.decode(payload)
    except msgspec.DecodeError:
        return _decode_other(payload, webhook_id)
    return TaskRunStatusEvent(data=body.data, timestamp=body.timestamp, webhook_id=webhook_id)


def _decode_other(payload: bytes, webhook_id: str) -> WebhookEvent:
    try:
        body = _BODY.decode(payload)
        if body.type == TASK_RUN_STATUS:
            _STATUS_BODY.decode(payload)  # raises the precise error
        stamp = body.timestamp if isinstance(body.timestamp, str) else None
        return UnknownWebhookEvent(
            type=body.type, data=_ANY.decode(body.data), timestamp=stamp, webhook_id=webhook_id
        )
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise WebhookVerificationError(
            f"webhook {webhook_id}: the signature is valid but the body is not the JSON "
            f"an event should be: {exc}"
        ) from None
    raise WebhookVerificationError(  # pragma: no cover - the strict decode above raised
        f"webhook {webhook_id}: unreadable {TASK_RUN_STATUS} body"
    )


# --- secrets ------------------------------------------------------------------------------------


class _Key(bytes):
    """An HMAC key: bytes whose repr never shows them (tracebacks that print locals)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<redacted>"


def _key(secret: object, error: type[ParallelError]) -> _Key:
    if isinstance(secret, str):
        if secret.startswith(_PREFIX):
            encoded = secret[len(_PREFIX) :]
            try:
                # Standard Webhooks secrets are padded base64; accept unpadded ones too.
                raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise error(
                    "a webhook secret starting with 'whsec_' must be base64 after the prefix"
                ) from None
        else:
            raw = secret.encode("utf-8", "surrogatepass")
    elif isinstance(secret, bytes | bytearray | memoryview):
        raw = bytes(secret)
    else:
        raise error(
            "a webhook secret must be a string ('whsec_...' or the raw secret) or bytes, "
            f"not {type(secret).__name__}"
        )
    if not raw:
        raise error("a webhook secret must not be empty")
    return _Key(raw)


class _Hidden(str):
    """A secret as a dict key: equal to (and hashed as) the str, but never shown by a repr."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<redacted>'"


_KEY_CACHE: dict[str, tuple[bytes, ...]] = {}  # verify(secret=...) on every delivery: parse once
_KEY_CACHE_SIZE = 16


def parse_secrets(secret: object, error: type[ParallelError]) -> tuple[bytes, ...]:
    """The HMAC keys of one secret or a list of them; ``error`` for anything malformed."""
    if type(secret) is str:
        keys = _KEY_CACHE.get(secret)
        if keys is None:
            keys = (_key(secret, error),)
            if len(_KEY_CACHE) >= _KEY_CACHE_SIZE:
                _KEY_CACHE.clear()
            _KEY_CACHE[_Hidden(secret)] = keys
        return keys
    if isinstance(secret, str | bytes | bytearray | memoryview):
        return (_key(secret, error),)
    if isinstance(secret, Sequence):
        keys = tuple(_key(s, error) for s in secret)
        if keys:
            return keys
        raise error("give at least one webhook secret")
    return (_key(secret, error),)  # raises the type error


# --- verification -------------------------------------------------------------------------------

_NAMES = ("webhook-id", "webhook-timestamp", "webhook-signature")


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):  # ASGI headers are bytes
        return value.decode("latin-1")
    return None


def _read_headers(headers: object) -> tuple[str | None, str | None, str | None]:
    """(id, timestamp, signature) from a mapping or (name, value) pairs, names in any case."""
    pairs: Iterable[Any]
    if isinstance(headers, Mapping):
        # Fast path: lowercase keys, or a case-insensitive mapping (aiohttp, Starlette).
        get = headers.get
        webhook_id, stamp, signature = (
            get("webhook-id"),
            get("webhook-timestamp"),
            get("webhook-signature"),
        )
        if type(webhook_id) is str and type(stamp) is str and type(signature) is str:
            return webhook_id, stamp, signature
        pairs = headers.items()
    elif isinstance(headers, Iterable) and not isinstance(headers, str | bytes):
        pairs = headers
    else:
        raise WebhookVerificationError(
            f"headers must be a mapping or (name, value) pairs, not {type(headers).__name__}"
        )
    values: dict[str, str | None] = dict.fromkeys(_NAMES)
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise WebhookVerificationError("each header must be a (name, value) pair")
        name, value = pair
        name = _text(name)
        if name is None:
            continue
        name = name.lower()
        if name in values and values[name] is None:
            values[name] = _text(value)
    return values["webhook-id"], values["webhook-timestamp"], values["webhook-signature"]


def _check_tolerance(tolerance: object) -> float:
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, int | float)
        or not 0 <= tolerance < float("inf")
    ):
        raise WebhookVerificationError(
            f"tolerance must be a number of seconds >= 0, got {tolerance!r}"
        )
    return float(tolerance)


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, str):  # the exact text re-encodes to the exact bytes
        return payload.encode("utf-8", "surrogatepass")
    raise WebhookVerificationError(
        f"the payload must be the raw request body (bytes), not {type(payload).__name__}"
    )


def _verify(payload: object, headers: object, keys: Sequence[bytes], tolerance: float) -> Any:
    body = _payload_bytes(payload)
    webhook_id, stamp, signatures = _read_headers(headers)
    if not webhook_id or not stamp or not signatures:
        missing = [n for n, v in zip(_NAMES, (webhook_id, stamp, signatures), strict=True) if not v]
        raise WebhookVerificationError(f"missing webhook header(s): {', '.join(missing)}")
    if len(webhook_id) > _MAX_ID or not (webhook_id.isascii() and webhook_id.isprintable()):
        raise WebhookVerificationError("malformed webhook-id header")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= _MAX_TIMESTAMP_DIGITS):
        raise WebhookVerificationError(
            f"webhook {webhook_id}: webhook-timestamp must be unix seconds, got {stamp[:20]!r}"
        )
    skew = time.time() - int(stamp)
    if skew > tolerance:
        raise WebhookVerificationError(
            f"webhook {webhook_id}: timestamp is {skew:.0f} s old (tolerance {tolerance:g} s)"
        )
    if -skew > tolerance:
        raise WebhookVerificationError(
            f"webhook {webhook_id}: timestamp is {-skew:.0f} s in the future "
            f"(tolerance {tolerance:g} s)"
        )
    signed = b"%s.%s.%s" % (webhook_id.encode(), stamp.encode(), body)
    candidates = [
        part[3:].encode()
        for part in signatures.split()
        if part.startswith("v1,") and part.isascii()
    ]
    for key in keys:
        expected = binascii.b2a_base64(hmac.digest(key, signed, "sha256"), newline=False)
        # Every candidate is compared (constant time each): no early exit to time.
        matched = False
        for candidate in candidates:
            matched |= hmac.compare_digest(expected, candidate)
        if matched:
            return _decode_event(body, webhook_id)
    raise WebhookVerificationError(
        f"webhook {webhook_id}: no v1 signature matches the webhook secret"
        + ("" if len(keys) == 1 else "s")
    )


def verify_with_keys(
    payload: object, headers: object, keys: Sequence[bytes], tolerance: float
) -> WebhookEvent:
    """`verify` with parsed keys; raises only `WebhookVerificationError`."""
    try:
        event: WebhookEvent = _verify(payload, headers, keys, tolerance)
    except WebhookVerificationError:
        raise
    except Exception as exc:  # a malformed input we did not foresee is still a bad delivery
        raise WebhookVerificationError(
            f"unreadable webhook delivery ({type(exc).__name__})"
        ) from None
    return event


def verify(
    payload: bytes | bytearray | memoryview | str,
    headers: Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]],
    secret: Secret,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
) -> WebhookEvent:
    """Verify one webhook delivery and return its typed event.

        event = verify(await request.read(), request.headers, os.environ["MY_SECRET"])
        if isinstance(event, TaskRunStatusEvent):
            print(event.data.run_id, event.data.status)

    Args:
        payload: the raw request body, exactly as received (not re-encoded JSON); its exact
            text is accepted too.
        headers: the request headers (any mapping, or ``(name, value)`` pairs such as an ASGI
            scope's); names in any case.
        secret: ``whsec_<base64>`` or the raw secret string (or bytes), or a list of secrets
            (during a rotation any one of them may match).
        tolerance: seconds ``webhook-timestamp`` may be off our clock, either way.

    Returns:
        `TaskRunStatusEvent` for ``task_run.status``; `UnknownWebhookEvent` for a type this
        version does not know, so a new kind of event never breaks a receiver.

    Raises:
        WebhookVerificationError: for every bad input (missing or malformed headers, no matching
            signature, a timestamp outside the tolerance, a body that is not the JSON it claims,
            a malformed secret); never another exception type.
    """
    keys = parse_secrets(secret, WebhookVerificationError)
    return verify_with_keys(payload, headers, keys, _check_tolerance(tolerance))


# --- dedup --------------------------------------------------------------------------------------


class WebhookDeduplicator:
    """A bounded, time-limited memory of ``webhook-id`` values (deliveries repeat).

    Each id is remembered for ``ttl`` seconds and at most ``max_ids`` are kept (the oldest are
    forgotten first), so memory stays bounded under any load. A repeat arriving after its id
    was forgotten is passed on again: handle events idempotently where it matters.
    """

    __slots__ = ("_clock", "_seen", "max_ids", "ttl")

    def __init__(
        self,
        *,
        ttl: float = 3600.0,
        max_ids: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            raise InvalidArgumentError(f"ttl must be a positive number of seconds, got {ttl!r}")
        if isinstance(max_ids, bool) or not isinstance(max_ids, int) or max_ids < 1:
            raise InvalidArgumentError(f"max_ids must be a positive int, got {max_ids!r}")
        self.ttl = float(ttl)
        self.max_ids = max_ids
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def is_duplicate(self, webhook_id: str) -> bool:
        """True if ``webhook_id`` was seen within ``ttl``; otherwise remember it, return False."""
        now = self._clock()
        seen = self._seen
        # Ids expire in insertion order (one ttl for all): drop the expired ones at the front.
        while seen:
            oldest, expiry = next(iter(seen.items()))
            if expiry > now:
                break
            del seen[oldest]
        if webhook_id in seen:
            return True
        seen[webhook_id] = now + self.ttl
        if len(seen) > self.max_ids:
            seen.popitem(last=False)
        return False


# --- the beta header ----------------------------------------------------------------------------


def webhook_betas(webhook: object, betas: Sequence[str] | None) -> Sequence[str] | None:
    """``betas`` plus ``webhook-2025-08-12`` when the run has a ``webhook`` (unchanged if not).

    A ``betas`` that is not a list is returned as is, for the usual check to refuse it.
    """
    if webhook is None or isinstance(betas, str):
        return betas
    if betas is None:
        return (WEBHOOK_BETA,)
    if WEBHOOK_BETA in betas:
        return betas
    return (*betas, WEBHOOK_BETA)

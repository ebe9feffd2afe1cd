"""Fault injection: scripted and probabilistic failures per endpoint.

A fault is drawn once per request, in this order: the endpoint's script, the ``"*"``
script, the endpoint's probabilities, the ``"*"`` probabilities. Scripts are consumed
one fault per request; once empty, the request proceeds normally (or falls through to
the probabilities). Probabilities use a seeded RNG so a failing test replays exactly.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from ._wire import error_response, malformed_response, message_for_status

__all__ = ["CURRENT_FAULT", "ENDPOINTS", "Fault", "FaultInjector", "FaultKind"]

FaultKind = Literal[
    "status", "drop", "drop_after", "slow", "malformed", "ok", "cut_stream", "duplicate"
]

ENDPOINTS: set[str] = {
    "create",
    "retrieve",
    "result",
    "input",
    "group_create",
    "group_retrieve",
    "group_add_runs",
    "group_events",
    "group_runs",
    "group_run",
    "run_events",
    "webhook",
}
"""Endpoint names faults can target (besides ``"*"``); route modules add theirs."""


@dataclass(frozen=True)
class Fault:
    """One injected failure. Build them with the class methods, e.g. ``Fault.drop()``.

    Faults are hashable values, so they can key a ``probabilities`` table.
    """

    kind: FaultKind
    code: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    after_events: int = 0

    @classmethod
    def status(
        cls,
        code: int,
        retry_after: str | float | None = None,
        retry_after_ms: str | float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """Answer ``code`` with an ``ErrorResponse`` body before processing (no side effect).

        ``retry_after`` / ``retry_after_ms`` set the ``Retry-After`` / ``retry-after-ms``
        headers verbatim (pass a string such as an HTTP date to test parsing).
        """
        if not 400 <= code <= 599:
            raise ValueError(f"a status fault needs a 4xx or 5xx code, not {code}")
        extra: dict[str, str] = dict(headers or {})
        if retry_after is not None:
            extra["Retry-After"] = str(retry_after)
        if retry_after_ms is not None:
            extra["retry-after-ms"] = str(retry_after_ms)
        return cls("status", code=code, headers=tuple(sorted(extra.items())))

    @classmethod
    def drop(cls) -> Fault:
        """Close the connection before processing, without sending any response byte."""
        return cls("drop")

    @classmethod
    def drop_after(cls) -> Fault:
        """Process the request fully (e.g. create the run), then close without answering."""
        return cls("drop_after")

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Wait ``seconds`` before handling the request normally."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be finite and >= 0, not {seconds!r}")
        return cls("slow", seconds=float(seconds))

    @classmethod
    def malformed(cls) -> Fault:
        """Answer 200 with a body that is not valid JSON, before processing."""
        return cls("malformed")

    @classmethod
    def cut_stream(cls, after_events: int = 0) -> Fault:
        """Close an SSE stream abruptly after ``after_events`` whole events.

        The next event is cut in half: its first bytes are sent, then the connection is
        closed without ending the chunked body. A stream that ends by itself before
        that point ends normally. On endpoints that do not stream it has no effect.
        """
        if isinstance(after_events, bool) or not isinstance(after_events, int):
            raise TypeError(f"after_events must be an int, not {type(after_events).__name__}")
        if after_events < 0:
            raise ValueError(f"after_events must be >= 0, not {after_events}")
        return cls("cut_stream", after_events=after_events)

    @classmethod
    def duplicate(cls) -> Fault:
        """On ``"webhook"``: deliver the event twice (same ``webhook-id``); elsewhere no effect."""
        return cls("duplicate")

    @classmethod
    def ok(cls) -> Fault:
        """No fault: a script entry that lets one request through untouched."""
        return cls("ok")

    def response(self) -> web.Response:
        """The response of a ``status`` or ``malformed`` fault."""
        if self.kind == "malformed":
            return malformed_response()
        if self.kind != "status":
            raise ValueError(f"a {self.kind!r} fault has no response of its own")
        detail = {"injected": True}
        return error_response(
            self.code, message_for_status(self.code), detail, headers=dict(self.headers)
        )


CURRENT_FAULT: ContextVar[Fault | None] = ContextVar("parallel_fake_fault", default=None)
"""The fault drawn for the request being handled (set by ``endpoint()``, read by streams)."""


def _check_endpoint(endpoint: str) -> None:
    if endpoint != "*" and endpoint not in ENDPOINTS:
        raise ValueError(
            f"unknown endpoint {endpoint!r}; expected '*' or one of {sorted(ENDPOINTS)}"
        )


class FaultInjector:
    """Holds the fault scripts and probability tables of one fake (``fake.faults``)."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._scripts: dict[str, deque[Fault]] = {}
        self._tables: dict[str, list[tuple[float, Fault]]] = {}

    def script(self, endpoint: str, faults: Iterable[Fault]) -> None:
        """Replace ``endpoint``'s script: the next requests get these faults, in order."""
        _check_endpoint(endpoint)
        self._scripts[endpoint] = deque(faults)

    def probabilities(self, endpoint: str, table: Mapping[Fault, float]) -> None:
        """Replace ``endpoint``'s table: each request gets a fault with these probabilities."""
        _check_endpoint(endpoint)
        if any(not 0 <= p <= 1 for p in table.values()) or sum(table.values()) > 1 + 1e-9:
            raise ValueError("probabilities must each be in [0, 1] and sum to at most 1")
        cumulative, rows = 0.0, []
        for fault, probability in table.items():
            cumulative += probability
            rows.append((cumulative, fault))
        self._tables[endpoint] = rows

    def clear(self, endpoint: str | None = None) -> None:
        """Forget scripts and tables, for one endpoint or (``None``) all of them."""
        if endpoint is None:
            self._scripts.clear()
            self._tables.clear()
        else:
            self._scripts.pop(endpoint, None)
            self._tables.pop(endpoint, None)

    def remaining(self, endpoint: str) -> int:
        """How many scripted faults ``endpoint`` has not consumed yet."""
        return len(self._scripts.get(endpoint, ()))

    def draw(self, endpoint: str, *, wildcard: bool = True) -> Fault | None:
        """The fault for the next request to ``endpoint``; ``None`` means none.

        ``wildcard=False`` ignores the ``"*"`` entries (webhooks are not requests to the API).
        """
        names = (endpoint, "*") if wildcard else (endpoint,)
        for name in names:
            script = self._scripts.get(name)
            if script:
                fault = script.popleft()
                return None if fault.kind == "ok" else fault
        for name in names:
            rows = self._tables.get(name)
            if rows:
                roll = self._rng.random()
                for threshold, fault in rows:
                    if roll < threshold:
                        return None if fault.kind == "ok" else fault
                return None
        return None

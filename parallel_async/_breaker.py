"""The client-wide circuit breaker: fail fast while the API does not accept connections.

Without it, every request against an unreachable API spends its whole retry policy (about 11 s
of backoff) before failing, one after the other: 200 inputs of a fan-out took 150 s to fail.
The breaker watches connection attempts at the one request path (and stream openings):

* **closed**: requests go through. Each `ConnectError` extends a streak of failures; any HTTP
  answer (whatever its status) ends it. A streak of at least `CircuitBreaker.failures` attempts
  spanning at least `CircuitBreaker.after` seconds opens the breaker: short blips, which the
  retry policy rides out, never do.
* **open**: for `CircuitBreaker.cooldown` seconds every attempt fails at once with
  `APIUnreachableError` (a `ConnectError` that is never retried: nothing was sent).
* **half-open**: then one attempt goes through as a probe, while the others still fail fast.
  An answer closes the breaker; a connection failure opens it for another cool-down; a probe
  that ends otherwise (a timeout, a cancellation) lets the next attempt probe.
"""

from __future__ import annotations

import math
import time
from types import TracebackType

import anyio
import msgspec

from ._errors import APIUnreachableError, ConnectError, InvalidArgumentError

__all__ = ["Breaker", "CircuitBreaker"]


class CircuitBreaker(msgspec.Struct, frozen=True, kw_only=True):
    """When the client stops trying an API that does not accept connections.

    Set it on the retry policy: ``RetryPolicy(circuit_breaker=CircuitBreaker(...))``, or
    ``circuit_breaker=None`` to never fail fast.

    Attributes:
        failures: connection attempts that must fail in a row, with no answer in between.
        after: seconds the failures must span (so that a blip the retries ride out never
            opens the breaker).
        cooldown: seconds every request then fails at once, before one probe is let through.
    """

    failures: int = 5
    after: float = 5.0
    cooldown: float = 5.0

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise InvalidArgumentError("CircuitBreaker.failures must be at least 1")
        if not (math.isfinite(self.after) and self.after >= 0):
            raise InvalidArgumentError("CircuitBreaker.after must be a number of seconds >= 0")
        if not (math.isfinite(self.cooldown) and self.cooldown > 0):
            raise InvalidArgumentError("CircuitBreaker.cooldown must be a number of seconds > 0")


class Breaker:
    """The breaker's state, one per client. ``with breaker.attempt(config, method, path):``
    around each connection attempt; ``config`` ``None`` turns it off."""

    __slots__ = ("_failures", "_first_failure", "_open_until", "_opening", "_probing")

    def __init__(self) -> None:
        self._failures = 0
        self._first_failure = 0.0
        self._open_until = 0.0  # > 0: opened (until then; half-open after)
        self._probing = False
        self._opening: anyio.Event | None = None  # set when the breaker next opens

    async def opened(self) -> None:
        """Return when the breaker next opens: retry pauses end then, and fail at once."""
        if self._opening is None:
            self._opening = anyio.Event()
        await self._opening.wait()

    @property
    def is_open(self) -> bool:
        """True while requests fail fast (the cool-down, or a probe in flight)."""
        return self._open_until > 0.0

    def check(self, config: CircuitBreaker | None, method: str, path: str) -> None:
        """Raise `APIUnreachableError` during a cool-down (before a create waits its turn)."""
        if config is not None and self._open_until and time.monotonic() < self._open_until:
            raise self._refusal(method, path)

    def attempt(self, config: CircuitBreaker | None, method: str, path: str) -> _Attempt:
        """Admit one attempt (raising `APIUnreachableError` if the breaker refuses it).

        Use the result at once in a ``with`` around the attempt: a probe is released when
        the block ends, whatever ends it.
        """
        if config is None:
            return _NO_ATTEMPT
        probe = False
        if self._open_until:
            if time.monotonic() < self._open_until or self._probing:
                raise self._refusal(method, path)
            probe = self._probing = True
        return _Attempt(self, probe, config, method, path)

    def _refusal(self, method: str, path: str) -> APIUnreachableError:
        wait = max(0.0, self._open_until - time.monotonic())
        return APIUnreachableError(
            f"the API is unreachable: {self._failures} connection attempts in a row failed; "
            f"failing fast (next try in {wait:.1f} s), {method} {path} was not sent",
            method=method,
            path=path,
        )

    def _answered(self) -> None:
        self._failures = 0
        self._open_until = 0.0
        self._probing = False

    def _connect_failed(self, config: CircuitBreaker, probe: bool) -> bool:
        """Count a failed connection; True if the breaker is open now."""
        now = time.monotonic()
        if self._failures == 0:
            self._first_failure = now
        self._failures += 1
        if probe:
            self._probing = False
        if self._open_until and now < self._open_until:
            return True  # opened meanwhile by another attempt
        if probe or (
            self._failures >= config.failures and now - self._first_failure >= config.after
        ):
            self._open_until = now + config.cooldown
            if self._opening is not None:
                self._opening.set()
                self._opening = None
            return True
        return False

    def _other(self, probe: bool) -> None:
        if probe:
            self._probing = False  # the next attempt probes


class _Attempt:
    """One admitted attempt: its outcome feeds the breaker when the ``with`` block ends."""

    __slots__ = ("_breaker", "_config", "_method", "_path", "_probe")

    def __init__(
        self,
        breaker: Breaker | None,
        probe: bool,
        config: CircuitBreaker | None = None,
        method: str = "",
        path: str = "",
    ) -> None:
        self._breaker = breaker
        self._probe = probe
        self._config = config
        self._method = method
        self._path = path

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        breaker, config = self._breaker, self._config
        if breaker is None or config is None:
            return
        if exc is None:
            breaker._answered()
        elif isinstance(exc, ConnectError):
            if breaker._connect_failed(config, self._probe):
                # the breaker is open: this request fails now too, instead of retrying
                raise breaker._refusal(self._method, self._path) from exc
        else:
            breaker._other(self._probe)


_NO_ATTEMPT = _Attempt(None, False)

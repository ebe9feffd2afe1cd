"""The one retry policy, on tenacity, applied at one layer (around a single HTTP exchange).

What is retried:

* 429, waiting exactly what ``retry-after-ms`` / ``Retry-After`` asks (no cap: if the wait would
  end past the caller's deadline we give up at once with the `RateLimitError`);
* 503, and connection failures before the request was sent (`ConnectError`): the server
  never processed the request, so even a create is safe to repeat;
* for idempotent requests (GETs) also 500/502/504, dropped connections and read timeouts.

A create that fails *after* its body may have been processed (500, 502, 504, a dropped
connection, a read timeout) is surfaced, never repeated: repeating could create a second run.
Backoff is exponential with jitter, bounded by attempts and by total time.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import anyio
import msgspec
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from ._backoff import backoff
from ._breaker import CircuitBreaker
from ._errors import (
    APIUnreachableError,
    ConnectError,
    DisconnectedError,
    InternalServerError,
    InvalidArgumentError,
    ParallelError,
    RateLimitError,
    TransportTimeoutError,
)

__all__ = ["RetryPolicy", "is_retryable", "set_testing"]

T = TypeVar("T")
log = logging.getLogger("parallel_async")

_IDEMPOTENT_ONLY_STATUSES = frozenset({500, 502, 504})


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How transient failures are retried.

    Attributes:
        attempts: most attempts per request, the first included (1 turns retries off).
        timeout: most seconds spent on one request's attempts and waits together. It also
            bounds a server-requested wait (``Retry-After``) when the caller gave no deadline:
            a longer wait fails at once with the `RateLimitError`.
        initial_backoff: first backoff, doubled after each failure.
        max_backoff: cap on the exponential backoff (a server's Retry-After is not capped).
        jitter: fraction of each backoff that is randomised, to spread synchronised clients.
        circuit_breaker: when to fail fast while the API does not accept connections
            (`CircuitBreaker`); ``None`` never does.
    """

    attempts: int = 6
    timeout: float = 300.0
    initial_backoff: float = 0.5
    max_backoff: float = 16.0
    jitter: float = 0.5
    circuit_breaker: CircuitBreaker | None = CircuitBreaker()

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidArgumentError("RetryPolicy.attempts must be at least 1")
        if self.timeout <= 0 or self.initial_backoff < 0 or self.max_backoff < 0:
            raise InvalidArgumentError("RetryPolicy timeout must be > 0 and backoffs >= 0")
        if not 0 <= self.jitter <= 1:
            raise InvalidArgumentError("RetryPolicy.jitter must be between 0 and 1")


def is_retryable(exc: BaseException, *, idempotent: bool) -> bool:
    """Whether ``exc`` may be retried; ``idempotent`` is False for creates."""
    if isinstance(exc, APIUnreachableError):  # the breaker is open: fail fast
        return False
    if isinstance(exc, RateLimitError | ConnectError):
        return True
    if isinstance(exc, InternalServerError):
        # A 503 is the API's (and its load balancer's) "not taken on": the request was refused
        # before processing, so even a create may be sent again. 500/502/504 may come after
        # the run was made, so a create surfaces them instead.
        return exc.status == 503 or (idempotent and exc.status in _IDEMPOTENT_ONLY_STATUSES)
    if isinstance(exc, DisconnectedError | TransportTimeoutError):
        return idempotent
    return False


def transient_failure(exc: BaseException) -> bool:
    """A GET that failed for good on something that may pass (5xx, a drop, a read timeout).

    Not a 429: one that survives the policy asked for a wait beyond the caller's deadline.
    """
    return not isinstance(exc, RateLimitError) and is_retryable(exc, idempotent=True)


class _TestMode:
    def __init__(self, attempts: int | None) -> None:
        self.attempts = attempts
        self.sleeps: list[float] = []


_testing: _TestMode | None = None


@contextmanager
def set_testing(*, attempts: int | None = None) -> Iterator[list[float]]:
    """Turn retry sleeping off (for tests), recording the waits that would have happened.

    Use as ``with set_testing() as sleeps: ...``; ``attempts`` optionally overrides every
    policy's attempt count. The previous mode is restored on exit.
    """
    global _testing  # noqa: PLW0603 - a process-wide switch, like stamina.set_testing
    previous, _testing = _testing, _TestMode(attempts)
    try:
        yield _testing.sleeps
    finally:
        _testing = previous


def sleeping_disabled() -> bool:
    """True inside `set_testing`: 429 pauses and retry waits are skipped."""
    return _testing is not None


async def sleep(seconds: float, wake: Callable[[], Awaitable[None]] | None = None) -> None:
    """Wait ``seconds``, or record the wait and return at once inside `set_testing`.

    ``wake``, when given, ends the wait early as soon as it returns.
    """
    if _testing is not None:
        _testing.sleeps.append(seconds)
        return
    if wake is None:
        await anyio.sleep(seconds)
        return
    with anyio.move_on_after(seconds):
        await wake()


class _Wait:
    """Tenacity wait: the server's Retry-After when it gave one, else jittered exponential."""

    __slots__ = ("_policy",)

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, RateLimitError) and exc.retry_after is not None:
            return float(exc.retry_after)
        p = self._policy
        return backoff(
            state.attempt_number - 1, first=p.initial_backoff, cap=p.max_backoff, jitter=p.jitter
        )


class _Stop:
    """Tenacity stop: out of attempts, out of retry time, or the wait would cross the deadline."""

    __slots__ = ("_attempts", "_deadline", "_timeout")

    def __init__(self, attempts: int, timeout: float, deadline: float | None) -> None:
        self._attempts = attempts
        self._timeout = timeout
        self._deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        if state.attempt_number >= self._attempts:
            return True
        wait = state.upcoming_sleep
        elapsed = state.seconds_since_start or 0.0
        if elapsed + wait > self._timeout:
            return True
        return self._deadline is not None and time.monotonic() + wait > self._deadline


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    log.debug(
        "retrying after %s (attempt %d, waiting %.2fs)",
        exc,
        state.attempt_number,
        state.upcoming_sleep,
    )


async def call_with_retry(
    policy: RetryPolicy,
    fn: Callable[[], Awaitable[T]],
    *,
    idempotent: bool,
    deadline: float | None = None,
    wake: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """Run ``fn`` (one HTTP exchange) under ``policy``; re-raise the last error when giving up.

    ``deadline`` is a ``time.monotonic()`` instant past which no retry wait may end; ``wake``
    returning ends a retry wait early (the circuit breaker opening: the next attempt then
    fails at once).
    """
    attempts = policy.attempts
    if _testing is not None and _testing.attempts is not None:
        attempts = _testing.attempts
    # Fast path: most calls succeed at once, and building a tenacity loop costs more than the
    # HTTP exchange's own Python overhead. The first failure hands over to tenacity.
    try:
        return await fn()
    except ParallelError as exc:
        if attempts <= 1 or not is_retryable(exc, idempotent=idempotent):
            raise
        first = exc
    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda e: is_retryable(e, idempotent=idempotent)),
        wait=_Wait(policy),
        stop=_Stop(attempts, policy.timeout, deadline),
        sleep=sleep if wake is None else functools.partial(sleep, wake=wake),
        before_sleep=_log_retry,
        reraise=True,
    )
    replayed = False

    async def attempt() -> T:
        nonlocal replayed
        if not replayed:  # let tenacity account for the failure the fast path already had
            replayed = True
            raise first
        return await fn()

    return await retrying(attempt)

"""The client-wide create limiter: at most N creates in any sliding window, paused by 429s."""

from __future__ import annotations

import math
import time
from collections import deque

import anyio

from ._errors import InvalidArgumentError, RunTimeoutError
from ._retry import sleeping_disabled

__all__ = ["CreateLimiter"]


class CreateLimiter:
    """Admit at most ``max_creates`` create requests in any ``window`` seconds.

    A sliding window matches the API's "2,000 per minute" exactly, where a token bucket would
    let a refill burst exceed it. Waiters are served one at a time, in arrival order, so a long
    queue of creates neither stampedes nor starves. `pause` holds every create (a 429 told
    us the server's view of the window differs from ours), once per window.
    """

    __slots__ = ("_lock", "_max", "_pause_started", "_paused_until", "_sent", "_window")

    def __init__(self, max_creates: int | None, window: float = 60.0) -> None:
        if max_creates is not None and max_creates < 1:
            raise InvalidArgumentError(
                "create_rate_limit must be a whole number >= 1 per window, or None for no limit"
            )
        if window <= 0:
            raise InvalidArgumentError("create_rate_window must be a positive number of seconds")
        self._max = max_creates
        # Requests arrive at the server a little after we stamp them: widen our window a bit
        # so our count never runs ahead of the server's.
        self._window = window + min(1.0, 0.05 * window)
        self._sent: deque[float] = deque()
        self._paused_until = 0.0
        self._pause_started = -math.inf
        self._lock = anyio.Lock()

    @property
    def max_creates(self) -> int | None:
        """Creates allowed per window (``None``: unlimited)."""
        return self._max

    @property
    def paused_until(self) -> float:
        """The ``time.monotonic()`` instant the current 429 pause ends (past: no pause)."""
        return self._paused_until

    def pause(self, seconds: float) -> None:
        """Hold all creates for ``seconds``, at most once per window.

        The first 429 of a window pauses every create; the others of that window (the rest of
        the same burst, or the odd 429 later on) only stretch that pause to the longest wait
        asked for, counted from when it started: they never start it again, so pauses do not
        stack up while each 429'd create waits out its own ``Retry-After`` anyway.
        """
        if sleeping_disabled():
            return
        now = time.monotonic()
        if now - self._pause_started < self._window:
            self._paused_until = max(self._paused_until, self._pause_started + seconds)
            return
        self._pause_started = now
        self._paused_until = max(self._paused_until, now + seconds)

    async def acquire(self, deadline: float | None = None) -> None:
        """Wait until one more create may be sent, and count it.

        A wait that would pass ``deadline`` (``time.monotonic()`` seconds) fails at once with
        `RunTimeoutError`: no create is sent, and the caller learns it now, not at the deadline.
        """
        if self._max is None and self._paused_until == 0.0:
            return
        if deadline is None:
            await self._acquire(None)
            return
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            await self._acquire(deadline)
            return
        raise _too_late()

    async def _acquire(self, deadline: float | None) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                if self._paused_until > now:
                    await self._sleep_until(self._paused_until, deadline)
                    continue
                if self._max is None:
                    return
                sent = self._sent
                while sent and sent[0] <= now - self._window:
                    sent.popleft()
                if len(sent) < self._max:
                    sent.append(now)
                    return
                await self._sleep_until(sent[0] + self._window, deadline)

    @staticmethod
    async def _sleep_until(when: float, deadline: float | None) -> None:
        if deadline is not None and when > deadline:
            raise _too_late()
        await anyio.sleep(max(0.0, when - time.monotonic()))


def _too_late() -> RunTimeoutError:
    # No run exists yet: the error says the deadline passed before the run was created.
    return RunTimeoutError(run_id="", last_status=None, timeout=None)

"""Sliding-window limiter for create requests (the API's documented quota model)."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

__all__ = ["SlidingWindow"]


class SlidingWindow:
    """Allow at most ``limit`` events in any ``window`` seconds."""

    __slots__ = ("_clock", "_events", "limit", "window")

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 1 or not (math.isfinite(window) and window > 0):
            raise ValueError("create_rate_limit needs max_creates >= 1 and window_seconds > 0")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._events: deque[float] = deque()

    def acquire(self) -> int | None:
        """Record one event and return ``None``, or return ``Retry-After`` seconds if full.

        The delay is rounded up to whole seconds (at least 1) so that a client waiting
        that long is guaranteed a free slot.
        """
        now = self._clock()
        events = self._events
        horizon = now - self.window
        while events and events[0] <= horizon:
            events.popleft()
        if len(events) < self.limit:
            events.append(now)
            return None
        return max(1, math.ceil(events[0] + self.window - now))

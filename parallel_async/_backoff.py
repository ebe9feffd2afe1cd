"""The one backoff: exponential, capped, optionally jittered.

Used by the retry layer (`RetryPolicy`) and by every loop that waits before trying again: the
early-408 guard, a group stream's pause before reconnecting, the reads that reconcile a lost
add. One formula, so "how long do we wait after the n-th failure" has one answer.
"""

from __future__ import annotations

import random

__all__ = ["backoff"]


def backoff(attempt: int, *, first: float, cap: float, jitter: float = 0.0) -> float:
    """Seconds to wait after the ``attempt``-th consecutive failure (0 for the first).

    ``first * 2**attempt``, at most ``cap``; a fraction ``jitter`` (0..1) of it is randomised
    downwards so synchronised clients spread out.
    """
    delay = min(cap, first * 2.0 ** min(attempt, 62))
    if jitter:
        delay *= 1 - jitter * random.random()  # noqa: S311 - spreading retries, not crypto
    return delay

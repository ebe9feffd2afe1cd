"""How long a run rests between polls.

Pure functions of what the ledger knows; the ledger (`parallel_async._ledger`) applies them.
"""

from __future__ import annotations

from ._backoff import backoff

__all__ = ["early_408_delay"]


def early_408_delay(asked: int, elapsed: float, streak: int) -> float:
    """Pause after a 408 that came ``elapsed`` s into an ``asked``-s wait (0: it held the wait).

    A server or proxy answering 408 long before the wait asked for would otherwise be polled in
    a hot loop: such early answers back off, 50 ms doubling to 1 s (``streak`` in a row).
    """
    if elapsed >= asked / 2:
        return 0.0
    return backoff(streak, first=0.05, cap=1.0)

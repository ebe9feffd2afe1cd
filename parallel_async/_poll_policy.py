"""How long a poll asks the server to wait, and how long a run rests between polls.

Pure functions of what the ledger knows; the ledger (`parallel_async._ledger`) applies them.
"""

from __future__ import annotations

from ._backoff import backoff

__all__ = ["early_408_delay", "rest_after_408", "server_wait"]


def early_408_delay(asked: int, elapsed: float, streak: int) -> float:
    """Pause after a 408 that came ``elapsed`` s into an ``asked``-s wait (0: it held the wait).

    A server or proxy answering 408 long before the wait asked for would otherwise be polled in
    a hot loop: such early answers back off, 50 ms doubling to 1 s (``streak`` in a row).
    """
    if elapsed >= asked / 2:
        return 0.0
    return backoff(streak, first=0.05, cap=1.0)


def server_wait(interval: int, long_poll: int, slots: int, backlog: int) -> int:
    """A poll's server wait, whole seconds, with ``backlog`` more runs due than ``slots``.

    Every run waiting for a slot should get one within about ``interval``: each slot hands
    over every ``interval * slots / backlog`` s, never less than ``interval``. A small backlog
    gets longer polls; none at all, the longest (a held poll costs nothing until it answers).
    """
    if backlog <= 0:
        return long_poll
    return min(long_poll, max(interval, interval * slots // backlog))


def rest_after_408(age: float, pace: float, cap: float) -> float:
    """How long a run ``age`` s into our polling rests after a 408 while runs queue for slots.

    A share of its age, capped: a young run goes straight back in the rotation, one that has
    gone on for minutes is asked about every ``cap`` s instead of every turn. For 1,000 runs
    of 10 s to 5 min on 256 slots that is about 11 requests per run (a rotation of 1-s polls
    sent 52) for a p99 lag of 15 s (2.5 s): `tests/test_poll_policy.py` replays it.
    """
    return min(cap, pace * age) if pace > 0 and age > 0 else 0.0

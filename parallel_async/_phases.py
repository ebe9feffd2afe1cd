"""The run ledger's vocabulary: a run's phases, the moves allowed between them, the entry
that tracks a run, and the actions the ledger returns (see `parallel_async._ledger`)."""

from __future__ import annotations

from enum import Enum
from typing import Any, NamedTuple

from ._deadline import Deadline
from ._errors import ParallelError
from ._models import TaskRunResult

__all__ = [
    "ACTIVE",
    "TRANSITIONS",
    "Action",
    "Emit",
    "Entry",
    "P",
    "Phase",
    "Poll",
    "StopPoll",
    "Wake",
]


class Phase(Enum):
    """Where a run is. Exactly one at a time."""

    CREATING = "creating"  # its create (or add) is on the wire
    UNRESOLVED = "unresolved"  # the add's answer was lost: looking for it by tag
    WAITING = "waiting"  # exists; a stream or webhook will say when it ends
    QUEUED = "queued"  # exists; waiting for a poll slot
    POLLING = "polling"  # a /result long-poll is open for it
    BACKOFF = "backoff"  # a rest before the next poll (a 408 came early, or a long run paces)
    FETCHING = "fetching"  # known completed: its /result answers at once
    DONE = "done"  # its outcome was emitted (the ledger forgets it)

    # Members are singletons: hash by identity, in C (Enum's own hash is Python code, and
    # phases key the ledger's counts on every move).
    __hash__ = object.__hash__


P = Phase
TRANSITIONS: frozenset[tuple[Phase, Phase]] = frozenset(
    {
        (P.CREATING, P.QUEUED),
        (P.CREATING, P.WAITING),
        (P.CREATING, P.UNRESOLVED),
        (P.CREATING, P.DONE),
        (P.UNRESOLVED, P.WAITING),
        (P.UNRESOLVED, P.DONE),
        (P.WAITING, P.QUEUED),
        (P.WAITING, P.FETCHING),
        (P.WAITING, P.DONE),
        (P.QUEUED, P.POLLING),
        (P.QUEUED, P.FETCHING),
        (P.QUEUED, P.DONE),
        (P.POLLING, P.QUEUED),
        (P.POLLING, P.BACKOFF),
        (P.POLLING, P.DONE),
        (P.BACKOFF, P.QUEUED),
        (P.BACKOFF, P.FETCHING),
        (P.BACKOFF, P.DONE),
        (P.FETCHING, P.POLLING),
        (P.FETCHING, P.DONE),
    }
)
"""Every allowed move; anything else raises `LedgerError`."""

ACTIVE = frozenset({P.WAITING, P.QUEUED, P.POLLING, P.BACKOFF, P.FETCHING})  # exists, not done


class Entry:
    """One tracked run; ``payload`` is its owner's (a fan-out's input), never read here."""

    __slots__ = (
        "asked",
        "deadline",
        "early",
        "failures",
        "index",
        "payload",
        "phase",
        "qseq",
        "run_id",
        "since",
        "status",
        "tag",
        "waiters",
    )

    def __init__(
        self, index: int, run_id: str | None, payload: Any, deadline: Deadline, phase: Phase
    ) -> None:
        self.index = index
        self.run_id = run_id
        self.payload = payload
        self.deadline = deadline
        self.phase = phase
        self.status: str | None = None  # the API's word for it, never a marker of ours
        self.tag: str | None = None
        self.asked = 0  # server wait of its last poll, s
        self.early = 0  # 408s in a row that came long before that wait
        self.failures = 0  # polls that failed for good on a transient error
        self.waiters = 0  # result-hub waiters sharing this run
        self.qseq = 0  # which of its queue slots is live (stale ones are skipped)
        self.since = -1.0  # when its first poll was sent (its age, for pacing); -1: not yet

    def __repr__(self) -> str:
        return f"Entry({self.index}, {self.run_id!r}, {self.phase.value})"


class Poll(NamedTuple):
    """Send one ``/result`` request for ``entry``, asking the server to hold it ``wait`` s."""

    entry: Entry
    wait: int


class Emit(NamedTuple):
    """``entry`` has ended: hand its outcome to whoever awaits it."""

    entry: Entry
    result: TaskRunResult | None
    error: ParallelError | None


class Wake(NamedTuple):
    """Report `Ledger.due` for ``entry`` after ``delay`` seconds."""

    entry: Entry
    delay: float


class StopPoll(NamedTuple):
    """Cancel the request open for ``entry``: its outcome is settled, or nobody waits."""

    entry: Entry


Action = Poll | Emit | Wake | StopPoll

"""The run ledger: every tracked run's phase, as one enum value, and its transition table.

Pure and synchronous, in the manner of h11's ``_state.py`` and httpcore's decide-then-act
pool: the I/O side (poll rotation, a group's event stream, the result hub, webhooks) reports
*facts* (a create answered or lost, a run event, a poll's answer, time passing) and carries out
the *actions* the ledger returns (send a poll, schedule a wake-up, cancel a poll, emit an
outcome). Time is passed in, never read here. A fact that does not fit a run's phase is a bug
and raises `LedgerError` at once instead of leaving a run to hang.

Phases::

    CREATING ──created──▶ QUEUED ◀─────────────┐           (poll rotation)
       │  └─created(follow)─▶ WAITING ──idle──┘│           (group stream / webhooks)
       │add lost                │ completed      │408
       ▼                        ▼                │
    UNRESOLVED ──tag seen──▶ FETCHING      QUEUED ─next_poll─▶ POLLING ──408, rest─▶ BACKOFF
       │                        │                                   │                   │ due
       └──settled/deadline──────┴────── answered / failed / deadline ▶ DONE ◀──────────┘

Done entries are forgotten at once: the ledger holds only runs still going, so memory is
bounded by the runs in flight, not by how many have passed through.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable
from typing import Any

from ._deadline import NEVER, Deadline
from ._defaults import LONG_POLL, PACE_CAP, TRANSIENT_ROUNDS
from ._errors import (
    CreateTimeoutError,
    LedgerError,
    ParallelError,
    RunCancelledError,
    RunFailedError,
    RunTimeoutError,
)
from ._models import TaskRun, TaskRunResult
from ._phases import ACTIVE, TRANSITIONS, Action, Emit, Entry, P, Phase, Poll, StopPoll, Wake
from ._poll_policy import early_408_delay, rest_after_408, server_wait

__all__ = [
    "TRANSITIONS",
    "Action",
    "Emit",
    "Entry",
    "Ledger",
    "Phase",
    "Poll",
    "StopPoll",
    "Wake",
    "early_408_delay",
]


class Ledger:
    """The runs one tracker (a fan-out, or the client's result hub) is waiting for.

    Args:
        slots: requests the owner may have open at once (for the poll-length choice).
        poll_interval: the shortest server wait, seconds, used while runs queue for slots.
        long_poll: the server wait when every run has a slot.
        pace: while more runs than slots are going, the share of its age a run rests after a
            408 (0: none; see `rest_after_408`), at most ``pace_cap`` s.
    """

    def __init__(
        self,
        *,
        slots: int,
        poll_interval: int = 1,
        long_poll: int = LONG_POLL,
        pace: float = 0.0,
        pace_cap: float = PACE_CAP,
    ) -> None:
        self._slots = slots
        self._interval = poll_interval
        self._long = long_poll
        self._pace = pace
        self._pace_cap = pace_cap
        # QUEUED in rotation order, and FETCHING (served before any poll). Entries leave lazily:
        # a slot is live only while its entry is still in that phase with the same ``qseq``.
        self._queue: deque[tuple[int, Entry]] = deque()
        self._fetch: deque[tuple[int, Entry]] = deque()
        self._by_run: dict[str, list[Entry]] = {}  # a run id may be tracked more than once
        self._by_tag: dict[str, Entry] = {}  # UNRESOLVED
        self._deadlines: list[tuple[float, int, Entry]] = []  # heap; done entries skipped lazily
        self._seq = itertools.count()
        self.counts: dict[Phase, int] = dict.fromkeys(Phase, 0)
        self._added = 0  # entries ever tracked (done ones too): outstanding without a sum
        self.api_queued = 0  # runs not done whose last known API status is "queued"
        self.producing = True  # more runs may still come (keeps polls short)
        self.others_waiting = 0  # requests of others (the result hub, other fan-outs) queued
        # for the same client-wide slots: a backlog too, so our polls stay short for them

    # --- bookkeeping ------------------------------------------------------------------------------

    def _move(self, entry: Entry, to: Phase) -> None:
        if (entry.phase, to) not in TRANSITIONS:
            raise LedgerError(f"impossible move {entry.phase.value} -> {to.value} for {entry!r}")
        self.counts[entry.phase] -= 1
        self.counts[to] += 1
        entry.phase = to
        if to is P.QUEUED:
            self._enqueue(self._queue, entry)
        elif to is P.FETCHING:
            self._enqueue(self._fetch, entry)
        elif to is P.DONE:
            self._forget(entry)

    def _enqueue(self, queue: deque[tuple[int, Entry]], entry: Entry) -> None:
        entry.qseq = seq = next(self._seq)
        queue.append((seq, entry))

    def _set_status(self, entry: Entry, status: str | None) -> None:
        if entry.phase is not P.DONE and entry.phase is not P.CREATING:
            self.api_queued += (status == "queued") - (entry.status == "queued")
        entry.status = status

    @property
    def queued(self) -> int:
        """Runs the API last reported ``queued`` (for progress)."""
        return self.api_queued

    @property
    def running(self) -> int:
        """Runs that exist and have not ended, other than those known to be queued."""
        c = self.counts
        active = c[P.WAITING] + c[P.QUEUED] + c[P.POLLING] + c[P.BACKOFF] + c[P.FETCHING]
        return active - self.api_queued

    def _forget(self, entry: Entry) -> None:
        if entry.status == "queued":
            self.api_queued -= 1
        if entry.run_id is not None:
            entries = self._by_run.get(entry.run_id)
            if entries is not None:
                if len(entries) == 1:
                    del self._by_run[entry.run_id]
                else:
                    entries.remove(entry)
        if entry.tag is not None and self._by_tag.get(entry.tag) is entry:
            del self._by_tag[entry.tag]
        # The heap keeps done entries until their deadline; compact it when they dominate.
        if len(self._deadlines) > 64 and len(self._deadlines) > 2 * self.outstanding:
            self._deadlines = [d for d in self._deadlines if d[2].phase is not P.DONE]
            heapq.heapify(self._deadlines)

    def _index(self, entry: Entry) -> None:
        if entry.run_id is not None:
            self._by_run.setdefault(entry.run_id, []).append(entry)
        if not entry.deadline.is_never:
            heapq.heappush(self._deadlines, (entry.deadline.at, next(self._seq), entry))

    def _done(
        self, entry: Entry, result: TaskRunResult | None, error: ParallelError | None
    ) -> Emit:
        self._move(entry, P.DONE)
        return Emit(entry, result, error)

    @property
    def outstanding(self) -> int:
        """Runs without an outcome yet."""
        return self._added - self.counts[P.DONE]

    @property
    def settled(self) -> bool:
        """Nothing left that a stream must tell us: every run is polled, fetched or done."""
        return self.counts[P.WAITING] == 0 and self.counts[P.UNRESOLVED] == 0

    def has_work(self) -> bool:
        """A poll or fetch is ready to be sent."""
        return self.counts[P.QUEUED] + self.counts[P.FETCHING] > 0

    def entries(self, run_id: str) -> list[Entry]:
        """The entries tracking ``run_id`` (empty when none)."""
        return self._by_run.get(run_id, [])

    def unresolved(self) -> list[Entry]:
        """Entries whose add answer was lost."""
        return list(self._by_tag.values())

    def waiting(self) -> list[Entry]:
        """Entries waiting for a stream to tell their end."""
        return [e for entries in self._by_run.values() for e in entries if e.phase is P.WAITING]

    # --- creation facts -------------------------------------------------------------------------

    def creating(self, index: int, payload: Any, deadline: Deadline = NEVER) -> Entry:
        """An input is about to be created (its create or add is being sent)."""
        entry = Entry(index, None, payload, deadline, P.CREATING)
        self.counts[P.CREATING] += 1
        self._added += 1
        if not deadline.is_never:
            heapq.heappush(self._deadlines, (deadline.at, next(self._seq), entry))
        return entry

    def track(
        self, index: int, run_id: str, payload: Any, deadline: Deadline = NEVER, *, follow: bool
    ) -> Entry:
        """An existing run joins (``as_completed``, a hub waiter): queued, or waiting on a
        stream when ``follow``."""
        entry = Entry(index, run_id, payload, deadline, P.WAITING if follow else P.QUEUED)
        self.counts[entry.phase] += 1
        self._added += 1
        if entry.phase is P.QUEUED:
            self._enqueue(self._queue, entry)
        self._index(entry)
        return entry

    def created(
        self, entry: Entry, run_id: str, status: str | None, deadline: Deadline, *, follow: bool
    ) -> None:
        """The create answered: the run exists. ``deadline`` (its own) starts now."""
        entry.run_id = run_id
        entry.deadline = deadline
        self._index(entry)
        self._move(entry, P.WAITING if follow else P.QUEUED)
        self._set_status(entry, status)

    def create_failed(self, entry: Entry, error: ParallelError) -> Emit:
        """The create failed for good: no run exists for this input."""
        return self._done(entry, None, error)

    def add_lost(self, entry: Entry, tag: str, deadline: Deadline) -> None:
        """The add's answer was lost; the run may exist, carrying ``tag`` in its metadata."""
        entry.tag = tag
        entry.deadline = deadline
        self._by_tag[tag] = entry
        if not deadline.is_never:
            heapq.heappush(self._deadlines, (deadline.at, next(self._seq), entry))
        self._move(entry, P.UNRESOLVED)

    def adopt(self, tag: str, run_id: str) -> Entry | None:
        """A run carrying ``tag`` was seen: it is the unresolved input's run (now waiting)."""
        entry = self._by_tag.pop(tag, None)
        if entry is None:
            return None
        entry.tag = None
        entry.run_id = run_id
        self._by_run.setdefault(run_id, []).append(entry)
        self._move(entry, P.WAITING)
        return entry

    def give_up(self, entry: Entry, cause: ParallelError) -> Emit:
        """An unresolved input's run never showed up: it ends with its add's error."""
        return self._done(entry, None, cause)

    # --- what the run did -----------------------------------------------------------------------

    def observed(self, run: TaskRun) -> list[Action]:
        """A run's status learnt from a stream, a listing or a webhook."""
        actions: list[Action] = []
        for entry in list(self._by_run.get(run.run_id, ())):
            self._set_status(entry, run.status)
            if not run.is_terminal:
                continue
            phase = entry.phase
            if run.status == "completed":
                if phase in (P.WAITING, P.QUEUED, P.BACKOFF):
                    self._move(entry, P.FETCHING)
                # POLLING: its open long-poll answers with the result by itself
            elif phase in ACTIVE:
                if phase is P.POLLING:
                    actions.append(StopPoll(entry))
                actions.append(self._done(entry, None, ended_error(run)))
        return actions

    def not_followed(self, entries: Iterable[Entry]) -> None:
        """No stream will tell these runs' ends (the group is idle, the stream keeps failing,
        the run is not in the group): poll them."""
        for entry in entries:
            if entry.phase is P.WAITING:
                self._move(entry, P.QUEUED)

    # --- polling --------------------------------------------------------------------------------

    def next_poll(self, at: float) -> Poll | Emit | None:
        """The next request to send (a fetch before any poll), or a timeout to emit."""
        while self._fetch or self._queue:
            seq, entry = self._fetch.popleft() if self._fetch else self._queue.popleft()
            if entry.qseq != seq or entry.phase not in (P.QUEUED, P.FETCHING):
                continue  # a stale slot: the entry moved on since it was queued
            if entry.deadline.passed(at):
                return self._done(entry, None, self.timeout_error(entry))
            wait = self.wait_for(entry, at)
            entry.asked = wait
            if entry.since < 0:
                entry.since = at
            self._move(entry, P.POLLING)
            return Poll(entry, wait)
        return None

    def wait_for(self, entry: Entry, at: float) -> int:
        """Server wait for ``entry``'s next poll, whole seconds (`server_wait`).

        The backlog is the runs beyond the slots (resting ones too: they are due again soon),
        plus others' requests queued for the same slots. While runs are still being created,
        polls stay short. Never past the run's deadline.
        """
        if entry.phase is P.FETCHING or self.producing:
            wait = self._interval
        else:
            wait = server_wait(self._interval, self._long, self._slots, self._backlog())
        if not entry.deadline.is_never:
            wait = max(1, min(wait, int(entry.deadline.remaining(at))))
        return wait

    def answered(self, entry: Entry, result: TaskRunResult) -> Emit:
        """``/result`` answered 200."""
        self._set_status(entry, "completed")
        return self._done(entry, result, None)

    def still_running(self, entry: Entry, elapsed: float, at: float) -> Wake | None:
        """``/result`` answered 408 after ``elapsed`` s: back in rotation, or rest a while
        first (the 408 came early, or a run that has gone on long paces its polls)."""
        if entry.phase is not P.POLLING:
            raise LedgerError(f"a 408 for {entry!r}, which has no poll open")
        delay = early_408_delay(entry.asked, elapsed, entry.early)
        if delay > 0:
            entry.early += 1
        else:
            entry.early = 0
            if self._more_runs_than_slots():
                delay = rest_after_408(at - entry.since, self._pace, self._pace_cap)
        delay = min(delay, entry.deadline.remaining(at))
        if delay > 0:
            self._move(entry, P.BACKOFF)
            return Wake(entry, delay)
        self._move(entry, P.QUEUED)
        return None

    def _more_runs_than_slots(self) -> bool:
        return self._backlog() > 0

    def _backlog(self) -> int:
        """Runs in the poll rotation (resting ones too) and others' queued requests, beyond
        the slots."""
        c = self.counts
        going = c[P.QUEUED] + c[P.FETCHING] + c[P.POLLING] + c[P.BACKOFF]
        return going + self.others_waiting - self._slots

    def ended(self, entry: Entry, run: TaskRun) -> Emit | None:
        """``/result`` answered 404 and the run's status was read: failed, cancelled, or
        (completed in between, still active) polled again."""
        self._set_status(entry, run.status)
        if run.status in ("failed", "cancelled"):
            return self._done(entry, None, ended_error(run))
        self._move(entry, P.QUEUED)
        return None

    def saw_status(self, entry: Entry, status: str | None) -> None:
        """A request for ``entry`` also told its status (a 404's status read, say)."""
        self._set_status(entry, status)

    def requeue(self, entry: Entry, status: str) -> None:
        """``/result`` answered 404 but the run's status says it is going (or just completed):
        poll it again."""
        self._set_status(entry, status)
        self._move(entry, P.QUEUED)

    def poll_failed(self, entry: Entry, error: ParallelError, *, transient: bool) -> Emit | None:
        """The poll failed after its retries. A transient failure requeues the run a few times:
        a healthy run must not end because the server had a bad minute."""
        if transient and entry.failures < TRANSIENT_ROUNDS:
            entry.failures += 1
            self._move(entry, P.QUEUED)
            return None
        return self._done(entry, None, error)

    def poll_cut(self, entry: Entry, at: float) -> Emit | None:
        """The poll was cut short by the deadline (or preempted): time out, or go around."""
        if entry.deadline.passed(at):
            return self._done(entry, None, self.timeout_error(entry))
        self._move(entry, P.QUEUED)
        return None

    def due(self, entry: Entry) -> None:
        """A `Wake` came due: the run rejoins the rotation (unless it ended meanwhile)."""
        if entry.phase is P.BACKOFF:
            self._move(entry, P.QUEUED)

    # --- time and waiters -----------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The soonest deadline of a run still going (``None``: none)."""
        heap = self._deadlines
        while heap and heap[0][2].phase is P.DONE:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire(self, at: float) -> list[Action]:
        """Every run whose deadline has passed ends with its timeout error."""
        actions: list[Action] = []
        heap = self._deadlines
        while heap and (heap[0][2].phase is P.DONE or heap[0][0] <= at):
            entry = heapq.heappop(heap)[2]
            if entry.phase is P.DONE or not entry.deadline.passed(at):
                continue  # done, or re-indexed with a later deadline
            actions.extend(self._end_now(entry, self.timeout_error(entry)))
        return actions

    def leave(self, entry: Entry) -> list[Action]:
        """A hub waiter left (cancelled, or its own timeout): the last one frees the run."""
        entry.waiters -= 1
        if entry.waiters > 0 or entry.phase is P.DONE:
            return []
        actions = self._end_now(entry, None)
        return [a for a in actions if not isinstance(a, Emit)]  # nobody left to tell

    def _end_now(self, entry: Entry, error: ParallelError | None) -> list[Action]:
        actions: list[Action] = []
        if entry.phase is P.POLLING:
            actions.append(StopPoll(entry))
        actions.append(self._done(entry, None, error))
        return actions

    def timeout_error(self, entry: Entry) -> RunTimeoutError:
        """The timeout error for ``entry``: no run created, or the run is still going."""
        timeout = entry.deadline.timeout
        if entry.run_id is None:
            return CreateTimeoutError(timeout=timeout)
        status = entry.status if entry.status is not None else None
        return RunTimeoutError(run_id=entry.run_id, last_status=status, timeout=timeout)

    # --- the result hub's facts (see `parallel_async._hub`) ----------------------------------

    def join(self, entry: Entry) -> None:
        """A hub waiter joined ``entry`` (`leave` is the other half)."""
        if entry.phase is P.DONE:
            raise LedgerError(f"a waiter joined {entry!r}, which is done")
        entry.waiters += 1

    def checked(self, entry: Entry, run: TaskRun, delay: float, at: float) -> Emit | Wake | None:
        """A status check (``GET`` the run, sent instead of a poll) answered with ``run``.

        The hub checks runs this way while more of them wait than there are slots, and every
        ``webhooks.poll_after`` for a run whose webhook has not come (its webhook is due only
        once it has ended, so it is never long-polled meanwhile). A failed
        or cancelled run ends; a completed one is fetched next (before any poll); an active
        one rejoins the rotation after ``delay`` s (never past its deadline), so checks come
        at a bounded rate instead of in a hot loop.
        """
        if entry.phase is not P.POLLING:
            raise LedgerError(f"a status check answered for {entry!r}, which has none open")
        self._set_status(entry, run.status)
        if run.status in ("failed", "cancelled"):
            return self._done(entry, None, ended_error(run))
        if run.status == "completed":
            self._move(entry, P.QUEUED)
            self._move(entry, P.FETCHING)
            return None
        entry.early = 0
        delay = min(delay, entry.deadline.remaining(at))
        if delay > 0:
            self._move(entry, P.BACKOFF)
            return Wake(entry, delay)
        self._move(entry, P.QUEUED)
        return None

    def followed(self, entry: Entry) -> tuple[Entry, list[Action]]:
        """A stream now tells the end of ``entry``'s run: stop polling it.

        Returns the entry now tracking the run (waiting on the stream, with the old one's
        waiters, status, deadline and payload) and the actions for the old one (its open poll
        cancelled). An entry already waiting, known completed (fetching) or done is kept.
        """
        if entry.phase in (P.WAITING, P.FETCHING, P.DONE) or entry.run_id is None:
            return entry, []
        actions: list[Action] = [a for a in self._end_now(entry, None) if not isinstance(a, Emit)]
        new = self.track(entry.index, entry.run_id, entry.payload, entry.deadline, follow=True)
        new.waiters = entry.waiters
        self._set_status(new, entry.status)
        return new, actions


def ended_error(run: TaskRun) -> ParallelError:
    """The error of a run that ended without a result."""
    if run.status == "cancelled":
        return RunCancelledError(f"run {run.run_id} was cancelled", run_id=run.run_id, run=run)
    return RunFailedError(run_id=run.run_id, run=run, error=run.error)

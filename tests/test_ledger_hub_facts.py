"""The ledger facts the result hub adds (``join``, ``checked``, ``followed``), as tables.

No sockets, no clock: time is passed in.
"""

from __future__ import annotations

import pytest

from parallel_async import ParallelError, RunCancelledError, RunFailedError, TaskRun
from parallel_async._deadline import Deadline
from parallel_async._errors import LedgerError
from parallel_async._ledger import Emit, Entry, Ledger, Phase, Poll, StopPoll, Wake

RUN = "trun_1"
T0 = 1000.0


def run(status: str) -> TaskRun:
    return TaskRun(
        run_id=RUN,
        status=status,
        is_active=status in ("queued", "running", "cancelling"),
        processor="lite",
        created_at="2026-01-01T00:00:00Z",
        modified_at="2026-01-01T00:00:00Z",
    )


def at_phase(ledger: Ledger, phase: Phase, deadline: Deadline | None = None) -> Entry:
    """A run brought to ``phase`` through the ledger's own facts."""
    follow = phase is Phase.WAITING
    entry = ledger.track(0, RUN, "payload", deadline or Deadline(T0 + 100, 100), follow=follow)
    if phase in (Phase.WAITING, Phase.QUEUED):
        return entry
    poll = ledger.next_poll(T0)
    assert poll is not None and poll.entry is entry
    if phase is Phase.BACKOFF:
        ledger.still_running(entry, 0.0, T0)  # a 408 at once: an early one
    elif phase is Phase.FETCHING:
        ledger.checked(entry, run("completed"), 0.0, T0)
    elif phase is Phase.DONE:
        ledger.poll_failed(entry, ParallelError("gone"), transient=False)
    assert entry.phase is phase
    return entry


def phase_of(entry: Entry) -> Phase:
    """The entry's phase now (a call, so a type checker does not narrow it across facts)."""
    return entry.phase


def new_ledger() -> Ledger:
    ledger = Ledger(slots=2)
    ledger.producing = False
    return ledger


# --- join ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [p for p in Phase if p not in (Phase.CREATING, Phase.UNRESOLVED)])
def test_join(phase: Phase) -> None:
    ledger = new_ledger()
    entry = at_phase(ledger, phase)
    if phase is Phase.DONE:
        with pytest.raises(LedgerError, match="done"):
            ledger.join(entry)
        return
    ledger.join(entry)
    ledger.join(entry)
    assert entry.waiters == 2
    assert ledger.leave(entry) == [] and entry.phase is phase  # one of two left
    ledger.leave(entry)
    assert phase_of(entry) is Phase.DONE  # the last one freed it


# --- checked ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "delay", "phase", "action"),
    [
        ("running", 2.5, Phase.BACKOFF, Wake),
        ("queued", 2.5, Phase.BACKOFF, Wake),
        ("action_required", 2.5, Phase.BACKOFF, Wake),
        ("running", 0.0, Phase.QUEUED, None),
        ("completed", 2.5, Phase.FETCHING, None),
        ("failed", 2.5, Phase.DONE, RunFailedError),
        ("cancelled", 2.5, Phase.DONE, RunCancelledError),
    ],
)
def test_checked(status: str, delay: float, phase: Phase, action: type | None) -> None:
    ledger = new_ledger()
    entry = at_phase(ledger, Phase.POLLING)
    fact = ledger.checked(entry, run(status), delay, T0 + 0.1)
    assert entry.phase is phase and entry.status == status
    if action is None:
        assert fact is None
    elif action is Wake:
        assert fact == Wake(entry, delay)
    else:
        assert isinstance(fact, Emit) and isinstance(fact.error, action)
    if phase is Phase.FETCHING:
        poll = ledger.next_poll(T0 + 0.2)  # fetched before any other run is polled
        assert isinstance(poll, Poll) and poll.entry is entry and poll.wait == 1


def test_a_check_never_pauses_past_the_deadline() -> None:
    ledger = new_ledger()
    entry = at_phase(ledger, Phase.POLLING, Deadline(T0 + 1.0, 1.0))
    fact = ledger.checked(entry, run("running"), 5.0, T0 + 0.4)
    assert isinstance(fact, Wake) and fact.delay == pytest.approx(0.6)


@pytest.mark.parametrize("phase", [Phase.QUEUED, Phase.BACKOFF, Phase.WAITING, Phase.DONE])
def test_a_check_answer_without_a_check_open_is_a_bug(phase: Phase) -> None:
    ledger = new_ledger()
    entry = at_phase(ledger, phase)
    with pytest.raises(LedgerError, match="has none open"):
        ledger.checked(entry, run("running"), 1.0, T0)


# --- followed -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "swapped", "stops"),
    [
        (Phase.QUEUED, True, False),
        (Phase.POLLING, True, True),
        (Phase.BACKOFF, True, False),
        (Phase.WAITING, False, False),
        (Phase.FETCHING, False, False),  # known completed: fetched anyway
        (Phase.DONE, False, False),
    ],
)
def test_followed(phase: Phase, swapped: bool, stops: bool) -> None:
    ledger = new_ledger()
    entry = at_phase(ledger, phase)
    if phase is not Phase.DONE:
        ledger.join(entry)
    entry.status = "running"
    new, actions = ledger.followed(entry)
    assert (new is not entry) is swapped
    assert actions == ([StopPoll(entry)] if stops else [])
    if swapped:
        assert entry.phase is Phase.DONE and new.phase is Phase.WAITING
        assert (new.waiters, new.status, new.payload) == (1, "running", "payload")
        assert new.deadline is entry.deadline
        assert ledger.entries(RUN) == [new]
        assert not ledger.has_work()
        ledger.not_followed([new])  # the stream is gone: polled again
        assert phase_of(new) is Phase.QUEUED
    else:
        assert new.phase is phase


def test_an_observed_completion_of_a_followed_run_is_fetched() -> None:
    ledger = new_ledger()
    entry = at_phase(ledger, Phase.QUEUED)
    ledger.join(entry)
    new, _ = ledger.followed(entry)
    assert ledger.observed(run("completed")) == []
    assert new.phase is Phase.FETCHING
    poll = ledger.next_poll(T0)
    assert poll is not None and poll.entry is new

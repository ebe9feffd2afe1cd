"""The run ledger as a table: every transition, every impossible move, and past hangs.

No sockets and no clock: facts go in with the time they happened, actions come out.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from parallel_async._deadline import NEVER, Deadline, Scope
from parallel_async._errors import (
    CreateTimeoutError,
    InternalServerError,
    LedgerError,
    NotFoundError,
    RunCancelledError,
    RunFailedError,
    RunTimeoutError,
)
from parallel_async._ledger import (
    TRANSITIONS,
    Emit,
    Entry,
    Ledger,
    Phase,
    Poll,
    StopPoll,
    Wake,
)
from parallel_async._models import TaskRun, TaskRunResult

P = Phase


class SpyLedger(Ledger):
    """Records every move it makes."""

    def __init__(self, **kwargs: int) -> None:
        kwargs.setdefault("slots", 2)
        super().__init__(**kwargs)
        self.moves: set[tuple[Phase, Phase]] = set()

    def _move(self, entry: Entry, to: Phase) -> None:
        self.moves.add((entry.phase, to))
        super()._move(entry, to)


def run(run_id: str, status: str, tag: str | None = None) -> TaskRun:
    meta = None if tag is None else {"pa_tag": tag}
    return msgspec.convert(
        {
            "run_id": run_id,
            "status": status,
            "is_active": status in ("queued", "running", "cancelling"),
            "processor": "base",
            "created_at": "2026-01-01T00:00:00Z",
            "modified_at": "2026-01-01T00:00:00Z",
            "metadata": meta,
            "error": {"ref_id": "r", "message": "boom"} if status == "failed" else None,
        },
        TaskRun,
    )


def result(run_id: str) -> TaskRunResult:
    return msgspec.convert(
        {
            "run": msgspec.to_builtins(run(run_id, "completed")),
            "output": {"type": "text", "content": "ok", "basis": []},
        },
        TaskRunResult,
    )


def ph(entry: Entry) -> Phase:
    """The entry's phase, read afresh (facts move it between asserts)."""
    return entry.phase


def at(seconds: float, timeout: float = 10.0, scope: Scope = Scope.RUN) -> Deadline:
    return Deadline(seconds, timeout, scope)


def poll(ledger: Ledger, now: float = 0.0) -> Poll:
    action = ledger.next_poll(now)
    assert isinstance(action, Poll), action
    return action


# --- scenarios: each drives one path through the table ------------------------------------------


def created_polled_answered(ledger: Ledger) -> None:
    entry = ledger.creating(0, "in")
    assert ph(entry) is P.CREATING
    ledger.created(entry, "trun_1", "queued", NEVER, follow=False)
    assert ph(entry) is P.QUEUED
    p = poll(ledger)
    assert p.entry is entry and ph(entry) is P.POLLING
    emit = ledger.answered(entry, result("trun_1"))
    assert emit.result is not None and emit.error is None
    assert ph(entry) is P.DONE and ledger.outstanding == 0


def create_failed(ledger: Ledger) -> None:
    entry = ledger.creating(0, "in")
    emit = ledger.create_failed(entry, InternalServerError("x", status=500, body=b""))
    assert emit.entry is entry and ph(entry) is P.DONE


def rotation_on_408(ledger: Ledger) -> None:
    a = ledger.track(0, "trun_a", None, follow=False)
    b = ledger.track(1, "trun_b", None, follow=False)
    p = poll(ledger)
    assert p.entry is a
    assert ledger.still_running(a, elapsed=p.wait, at=1.0) is None  # held the wait: no pause
    assert ph(a) is P.QUEUED
    assert poll(ledger, 1.0).entry is b  # rotation: b before a again
    assert poll(ledger, 1.0).entry is a


def early_408_backs_off(ledger: Ledger) -> None:
    entry = ledger.track(0, "trun_a", None, follow=False)
    poll(ledger)
    wake = ledger.still_running(entry, elapsed=0.0, at=0.0)
    assert isinstance(wake, Wake) and wake.delay == 0.05 and ph(entry) is P.BACKOFF
    assert ledger.next_poll(0.0) is None  # nothing to send while it pauses
    ledger.due(entry)
    assert ph(entry) is P.QUEUED
    poll(ledger)
    wake = ledger.still_running(entry, elapsed=0.0, at=0.0)
    assert isinstance(wake, Wake) and wake.delay == 0.1  # doubling


def followed_run_completes(ledger: Ledger) -> None:
    entry = ledger.creating(0, "in")
    ledger.created(entry, "trun_1", "queued", NEVER, follow=True)
    assert ph(entry) is P.WAITING and ledger.next_poll(0.0) is None
    assert ledger.observed(run("trun_1", "running")) == []
    assert entry.status == "running" and ph(entry) is P.WAITING
    assert ledger.observed(run("trun_1", "completed")) == []
    assert ph(entry) is P.FETCHING
    p = poll(ledger)
    assert p.wait == 1  # a fetch answers at once: never a long wait
    ledger.answered(entry, result("trun_1"))


def followed_run_fails(ledger: Ledger) -> None:
    entry = ledger.track(0, "trun_1", None, follow=True)
    (emit,) = ledger.observed(run("trun_1", "failed"))
    assert isinstance(emit, Emit) and isinstance(emit.error, RunFailedError)
    assert ph(entry) is P.DONE


def cancelled_while_polling(ledger: Ledger) -> None:
    entry = ledger.track(0, "trun_1", None, follow=False)
    poll(ledger)
    stop, emit = ledger.observed(run("trun_1", "cancelled"))
    assert stop == StopPoll(entry)
    assert isinstance(emit, Emit) and isinstance(emit.error, RunCancelledError)


def completed_while_queued_or_backing_off(ledger: Ledger) -> None:
    a = ledger.track(0, "trun_a", None, follow=False)
    b = ledger.track(1, "trun_b", None, follow=False)
    poll(ledger)
    ledger.still_running(a, elapsed=0.0, at=0.0)  # a pauses
    ledger.observed(run("trun_a", "completed"))
    ledger.observed(run("trun_b", "completed"))
    assert ph(a) is P.FETCHING and ph(b) is P.FETCHING
    assert {poll(ledger).entry, poll(ledger).entry} == {a, b}


def stream_gives_up(ledger: Ledger) -> None:
    entry = ledger.track(0, "trun_1", None, follow=True)
    ledger.not_followed(ledger.waiting())
    assert ph(entry) is P.QUEUED
    assert poll(ledger).entry is entry


def lost_add_adopted_by_tag(ledger: Ledger) -> None:
    entry = ledger.creating(0, "in")
    ledger.add_lost(entry, "tag-0", NEVER)
    assert ph(entry) is P.UNRESOLVED and not ledger.settled
    assert ledger.adopt("tag-0", "trun_9") is entry
    assert ph(entry) is P.WAITING and entry.run_id == "trun_9"
    ledger.observed(run("trun_9", "completed"))
    assert ph(entry) is P.FETCHING


def lost_add_given_up(ledger: Ledger) -> None:
    entry = ledger.creating(0, "in")
    ledger.add_lost(entry, "tag-0", NEVER)
    cause = InternalServerError("lost", status=502, body=b"")
    emit = ledger.give_up(entry, cause)
    assert emit.error is cause and ledger.adopt("tag-0", "trun_9") is None


def not_found_then_status(ledger: Ledger) -> None:
    entry = ledger.track(0, "trun_1", None, follow=False)
    poll(ledger)
    ledger.requeue(entry, "running")  # 404, then the status read says it is still going
    assert ph(entry) is P.QUEUED
    poll(ledger)
    emit = ledger.poll_failed(entry, NotFoundError("gone", status=404, body=b""), transient=False)
    assert isinstance(emit, Emit) and ph(entry) is P.DONE


def transient_failures_requeue_a_few_times(ledger: Ledger) -> None:
    entry = ledger.track(0, "trun_1", None, follow=False)
    err = InternalServerError("bad minute", status=502, body=b"")
    for _ in range(3):
        poll(ledger)
        assert ledger.poll_failed(entry, err, transient=True) is None
    poll(ledger)
    emit = ledger.poll_failed(entry, err, transient=True)
    assert isinstance(emit, Emit) and emit.error is err


def deadlines(ledger: Ledger) -> None:
    queued = ledger.track(0, "trun_q", None, at(5), follow=False)
    waiting = ledger.track(1, "trun_w", None, at(6), follow=True)
    backing = ledger.track(2, "trun_b", None, at(7), follow=False)
    polling = ledger.track(3, "trun_p", None, at(8), follow=False)
    fetching = ledger.track(4, "trun_f", None, at(9), follow=True)
    unresolved = ledger.creating(5, "in")
    ledger.add_lost(unresolved, "tag", at(9.5))
    assert poll(ledger).entry is queued
    ledger.still_running(queued, 0.0, 0.0)  # queued -> backoff ... (re-use as "backing")
    ledger.due(queued)
    assert poll(ledger).entry is backing
    ledger.still_running(backing, 0.0, 0.0)
    assert poll(ledger).entry is polling
    ledger.observed(run("trun_f", "completed"))
    assert ledger.next_deadline() == 5
    assert ledger.expire(4.9) == []
    actions = ledger.expire(10.0)
    ended = {a.entry for a in actions if isinstance(a, Emit)}
    assert ended == {queued, waiting, backing, polling, fetching, unresolved}
    assert StopPoll(polling) in actions
    errors = {a.entry.index: a.error for a in actions if isinstance(a, Emit)}
    assert isinstance(errors[5], CreateTimeoutError)
    assert isinstance(errors[1], RunTimeoutError) and not isinstance(errors[1], CreateTimeoutError)
    assert ledger.outstanding == 0 and ledger.next_deadline() is None


def deadline_seen_at_poll_time(ledger: Ledger) -> None:
    entry = ledger.track(0, "trun_1", None, at(5), follow=False)
    emit = ledger.next_poll(6.0)
    assert isinstance(emit, Emit) and isinstance(emit.error, RunTimeoutError)
    assert ph(entry) is P.DONE


def poll_cut(ledger: Ledger) -> None:
    entry = ledger.track(0, "trun_1", None, at(5), follow=False)
    poll(ledger)
    assert ledger.poll_cut(entry, 1.0) is None  # preempted before its deadline: goes around
    assert ph(entry) is P.QUEUED
    poll(ledger)
    emit = ledger.poll_cut(entry, 5.0)
    assert isinstance(emit, Emit) and isinstance(emit.error, RunTimeoutError)


def last_waiter_leaves(ledger: Ledger) -> None:
    entry = ledger.track(0, "trun_1", None, follow=False)
    entry.waiters = 2
    poll(ledger)
    assert ledger.leave(entry) == []  # another waiter still wants it
    assert ledger.leave(entry) == [StopPoll(entry)]  # nobody left: free the slot, emit nothing
    assert ph(entry) is P.DONE and ledger.outstanding == 0


SCENARIOS: list[Callable[[Ledger], None]] = [
    created_polled_answered,
    create_failed,
    rotation_on_408,
    early_408_backs_off,
    followed_run_completes,
    followed_run_fails,
    cancelled_while_polling,
    completed_while_queued_or_backing_off,
    stream_gives_up,
    lost_add_adopted_by_tag,
    lost_add_given_up,
    not_found_then_status,
    transient_failures_requeue_a_few_times,
    deadlines,
    deadline_seen_at_poll_time,
    poll_cut,
    last_waiter_leaves,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_scenario(scenario: Callable[[Ledger], None]) -> None:
    scenario(SpyLedger())


def test_the_scenarios_cover_every_transition() -> None:
    covered: set[tuple[Phase, Phase]] = set()
    for scenario in SCENARIOS:
        ledger = SpyLedger()
        scenario(ledger)
        covered |= ledger.moves
    assert covered <= TRANSITIONS
    missing = sorted((a.value, b.value) for a, b in TRANSITIONS - covered)
    assert not missing, f"transitions no scenario exercises: {missing}"


@pytest.mark.parametrize(
    ("src", "dst"),
    [(a, b) for a in Phase for b in Phase if (a, b) not in TRANSITIONS],
    ids=lambda p: str(getattr(p, "value", p)),
)
def test_every_impossible_move_raises(src: Phase, dst: Phase) -> None:
    ledger = Ledger(slots=1)
    entry = Entry(0, "trun_1", None, NEVER, src)
    ledger.counts[src] += 1
    with pytest.raises(LedgerError, match="impossible move"):
        ledger._move(entry, dst)
    assert entry.phase is src


def test_a_408_for_a_run_without_a_poll_is_a_bug() -> None:
    ledger = Ledger(slots=1)
    entry = ledger.track(0, "trun_1", None, follow=True)
    with pytest.raises(LedgerError):
        ledger.still_running(entry, 1.0, 1.0)


@pytest.mark.parametrize(
    ("tracked", "slots", "producing", "expected"),
    [
        (1, 4, False, 30),  # every run has a slot: the longest poll
        (4, 4, False, 30),
        (12, 4, False, 1),  # a backlog of 8 over 4 slots: hand over every second
        (6, 4, False, 2),  # a small backlog gets longer polls
        (1, 4, True, 1),  # more runs are coming: stay short
    ],
)
def test_wait_for_follows_the_backlog(
    tracked: int, slots: int, producing: bool, expected: int
) -> None:
    ledger = Ledger(slots=slots, poll_interval=1)
    ledger.producing = producing
    for i in range(tracked):
        ledger.track(i, f"trun_{i}", None, follow=False)
    assert poll(ledger).wait == expected


def test_a_poll_never_asks_past_the_run_deadline() -> None:
    ledger = Ledger(slots=4)
    ledger.producing = False
    ledger.track(0, "trun_1", None, at(7.5), follow=False)
    assert poll(ledger, 0.0).wait == 7
    ledger2 = Ledger(slots=4)
    ledger2.producing = False
    ledger2.track(0, "trun_1", None, at(0.4), follow=False)
    assert poll(ledger2, 0.0).wait == 1  # under a second left: one, cut at the deadline


# --- the sequences behind past hangs ------------------------------------------------------------


def test_an_add_answer_lost_after_every_earlier_run_finished_keeps_the_fan_out_open() -> None:
    ledger = Ledger(slots=2)
    first = ledger.creating(0, "a")
    ledger.created(first, "trun_a", "queued", NEVER, follow=True)
    ledger.observed(run("trun_a", "completed"))
    ledger.answered(poll(ledger).entry, result("trun_a"))
    lost = ledger.creating(1, "b")
    ledger.add_lost(lost, "tag-b", NEVER)
    ledger.producing = False
    # not settled: whoever follows the stream must keep looking for tag-b
    assert ledger.outstanding == 1 and not ledger.settled
    assert ledger.unresolved() == [lost]


def test_a_run_event_during_reconciliation_is_matched_by_tag() -> None:
    ledger = Ledger(slots=2)
    entry = ledger.creating(0, "a")
    # the terminal event arrives before we know the run id: nothing matches it by id...
    assert ledger.observed(run("trun_x", "completed", tag="tag-a")) == []
    ledger.add_lost(entry, "tag-a", NEVER)
    # ...the engine holds it and matches it by tag once the add gave up
    assert ledger.adopt("tag-a", "trun_x") is entry
    ledger.observed(run("trun_x", "completed", tag="tag-a"))
    assert ph(entry) is P.FETCHING


def test_a_lazy_sources_first_add_lost_still_needs_the_follower() -> None:
    ledger = Ledger(slots=2)
    entry = ledger.creating(0, "a")
    ledger.add_lost(entry, "tag-a", NEVER)
    assert not ledger.settled and ledger.outstanding == 1
    assert ledger.waiting() == []  # nothing by run id: the follower must look by tag


def test_done_runs_are_forgotten() -> None:
    ledger = Ledger(slots=4)
    ledger.producing = False
    for i in range(1000):
        e = ledger.creating(i, object())
        ledger.created(e, f"trun_{i}", "queued", at(100.0 + i), follow=True)
        ledger.observed(run(f"trun_{i}", "completed"))
        ledger.answered(poll(ledger).entry, result(f"trun_{i}"))
    assert ledger.outstanding == 0
    assert ledger._by_run == {}
    assert len(ledger._deadlines) <= 64  # done entries compacted out of the deadline heap


def test_the_internals_page_lists_exactly_the_transitions() -> None:
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "internals.md").read_text()
    table = page.split("<!-- transitions-table -->", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:3] for line in table.strip().splitlines()[2:]]
    documented = {(Phase(a.strip()), Phase(b.strip())) for a, b in rows}
    assert documented == TRANSITIONS


def test_requests_queued_elsewhere_for_the_slots_keep_polls_short() -> None:
    ledger = Ledger(slots=4, poll_interval=1)
    ledger.producing = False
    ledger.track(0, "trun_1", None, follow=False)
    ledger.others_waiting = 8  # e.g. result() waiters of the hub, queued for the same slots
    assert poll(ledger).wait == 1

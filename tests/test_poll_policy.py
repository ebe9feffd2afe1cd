"""The fan-out's poll policy, pure: how long a poll waits, how long a run rests after a 408.

The last tests replay whole fan-outs through the real `Ledger` on a simulated clock (no
sockets): every run is delivered once, and the requests per run and the delivery lag of the
defaults are pinned for short runs and for long ones.
"""

from __future__ import annotations

import heapq
import random

import msgspec
import pytest

from parallel_async._deadline import NEVER, Deadline, Scope
from parallel_async._defaults import FANOUT_POLL_INTERVAL, PACE, PACE_CAP
from parallel_async._ledger import Emit, Entry, Ledger, Phase, Poll, Wake
from parallel_async._models import TaskRunResult
from parallel_async._poll_policy import rest_after_408, server_wait

P = Phase

RESULT = msgspec.convert(
    {
        "run": {
            "run_id": "trun_x",
            "status": "completed",
            "is_active": False,
            "processor": "base",
            "created_at": "2026-01-01T00:00:00Z",
            "modified_at": "2026-01-01T00:00:00Z",
        },
        "output": {"type": "text", "content": "ok", "basis": []},
    },
    TaskRunResult,
)


@pytest.mark.parametrize(
    ("age", "pace", "cap", "expected"),
    [
        (0.0, 0.2, 15.0, 0.0),  # a first poll's 408: straight back
        (10.0, 0.2, 15.0, 2.0),  # a share of its age
        (200.0, 0.2, 15.0, 15.0),  # never longer than the cap
        (200.0, 0.0, 15.0, 0.0),  # pacing off
    ],
)
def test_rest_after_408(age: float, pace: float, cap: float, expected: float) -> None:
    assert rest_after_408(age, pace, cap) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("backlog", "expected"),
    [(-5, 30), (0, 30), (1, 12), (8, 3), (4, 3), (2, 6), (1000, 3)],
)
def test_server_wait(backlog: int, expected: int) -> None:
    # 3 s shortest wait, 4 slots, 30 s long polls
    assert server_wait(3, 30, 4, backlog) == expected


def ph(entry: Entry) -> Phase:
    """The entry's phase, read afresh (facts move it between asserts)."""
    return entry.phase


def paced_ledger(runs: int, slots: int) -> tuple[Ledger, list[Entry]]:
    ledger = Ledger(slots=slots, poll_interval=3, pace=0.2, pace_cap=15.0)
    ledger.producing = False
    entries = [ledger.track(i, f"trun_{i}", None, NEVER, follow=False) for i in range(runs)]
    return ledger, entries


def test_a_young_run_goes_straight_back_and_an_old_one_rests() -> None:
    ledger, entries = paced_ledger(runs=6, slots=2)
    entry = entries[0]
    p = ledger.next_poll(0.0)
    assert isinstance(p, Poll) and p.entry is entry
    # 408 at once (age 0 at its first poll): no rest
    assert ledger.still_running(entry, 3.0, 0.0) is None
    assert ph(entry) is P.QUEUED
    # later, at age 50 s, its poll held 3 s and answered 408: rests 0.2 x 50 = 10 s
    while (p := ledger.next_poll(50.0)) is not None and p.entry is not entry:
        assert isinstance(p, Poll)
        ledger.still_running(p.entry, 3.0, 50.0)  # the others' first 408s: age 0, no rest
    assert isinstance(p, Poll)
    wake = ledger.still_running(entry, 3.0, 50.0)
    assert isinstance(wake, Wake) and wake.delay == pytest.approx(10.0)
    assert ph(entry) is P.BACKOFF
    ledger.due(entry)
    assert ph(entry) is P.QUEUED


def test_no_rest_when_every_run_has_a_slot() -> None:
    ledger, _ = paced_ledger(runs=2, slots=2)
    p = ledger.next_poll(0.0)
    assert isinstance(p, Poll) and p.wait == 30  # every run has a slot: long polls
    assert ledger.still_running(p.entry, 30.0, 500.0) is None
    assert p.entry.phase is P.QUEUED


def test_a_rest_never_passes_the_run_deadline() -> None:
    ledger = Ledger(slots=1, poll_interval=3, pace=0.2, pace_cap=15.0)
    ledger.producing = False
    near = ledger.track(0, "trun_0", None, Deadline(104.0, 104.0, Scope.RUN), follow=False)
    ledger.track(1, "trun_1", None, NEVER, follow=False)
    p = ledger.next_poll(0.0)
    assert isinstance(p, Poll) and p.entry is near
    wake = ledger.still_running(near, 3.0, 100.0)  # would rest 15 s; 4 s are left
    assert isinstance(wake, Wake) and wake.delay == pytest.approx(4.0)


def test_resting_runs_still_count_in_the_backlog() -> None:
    # they are due again within PACE_CAP s: the polls of the others must not hold the slots
    # for a long poll meanwhile
    ledger, _ = paced_ledger(runs=8, slots=4)
    first = [ledger.next_poll(0.0) for _ in range(4)]
    for p in first:
        assert isinstance(p, Poll)
        assert isinstance(ledger.still_running(p.entry, 3.0, 100.0), Wake)  # age 100: rests
    assert ledger.counts[P.BACKOFF] == 4
    p = ledger.next_poll(100.0)
    assert isinstance(p, Poll) and p.wait == server_wait(3, 30, 4, 8 - 4) == 3


# --- whole fan-outs on a simulated clock --------------------------------------------------------


def simulate(
    n: int, slots: int, spread: tuple[float, float], *, interval: int, pace: float, seed: int = 0
) -> tuple[float, float, int]:
    """Await ``n`` runs that finish uniformly over ``spread`` s: (requests/run, lag p99, done).

    A poll asked to wait ``w`` s answers at once if its run has finished, at the run's end if
    that comes within ``w``, else a 408 after ``w``; each answer takes 2 ms.
    """
    rng = random.Random(seed)
    ledger = Ledger(slots=slots, poll_interval=interval, pace=pace, pace_cap=PACE_CAP)
    ledger.producing = False
    ends = {}
    for i in range(n):
        entry = ledger.track(i, f"trun_{i}", None, NEVER, follow=False)
        ends[entry.index] = rng.uniform(*spread)
    events: list[tuple[float, int, str, Entry]] = []
    seq = 0
    open_polls = 0
    requests = 0
    lags: list[float] = []
    delivered: set[int] = set()

    def send(now: float) -> None:
        nonlocal open_polls, requests, seq
        while open_polls < slots:
            action = ledger.next_poll(now)
            if action is None:
                return
            assert isinstance(action, Poll)
            open_polls += 1
            requests += 1
            end = ends[action.entry.index]
            if end <= now + action.wait:
                heapq.heappush(events, (max(now, end) + 0.002, seq, "200", action.entry))
            else:
                heapq.heappush(events, (now + action.wait + 0.002, seq, "408", action.entry))
            seq += 1

    send(0.0)
    now = 0.0
    while events:
        now, _, kind, entry = heapq.heappop(events)
        if kind == "due":
            ledger.due(entry)
        else:
            open_polls -= 1
            if kind == "200":
                emit = ledger.answered(entry, RESULT)
                assert isinstance(emit, Emit) and entry.index not in delivered
                delivered.add(entry.index)
                lags.append(now - ends[entry.index])
            else:
                wake = ledger.still_running(entry, float(entry.asked), now)
                if wake is not None:
                    heapq.heappush(events, (now + wake.delay, seq, "due", entry))
                    seq += 1
        send(now)
    assert ledger.outstanding == 0
    lags.sort()
    return requests / n, lags[int(len(lags) * 0.99)], len(delivered)


def test_short_runs_cost_about_one_request_each_at_a_lag_below_a_held_slot_per_run() -> None:
    # the benchmark's shape: 1,000 runs finishing within 0.5-5 s, 256 slots
    per_run, p99, done = simulate(1000, 256, (0.5, 5.0), interval=FANOUT_POLL_INTERVAL, pace=PACE)
    assert done == 1000
    assert per_run <= 1.2  # 1-s rotation: 1.8
    assert p99 <= 3.0  # a loop holding a slot per run until it ends: 3.1 s


def test_long_runs_pace_their_polls() -> None:
    # 1,000 runs of 10 s to 5 min on 256 slots: a 1-s rotation sent 52 requests per run
    per_run, p99, done = simulate(
        1000, 256, (10.0, 300.0), interval=FANOUT_POLL_INTERVAL, pace=PACE
    )
    assert done == 1000
    assert per_run <= 12.0
    assert p99 <= PACE_CAP + 2 * FANOUT_POLL_INTERVAL  # the rest's cap bounds it
    unpaced, _, _ = simulate(1000, 256, (10.0, 300.0), interval=1, pace=0.0)
    assert unpaced >= 3 * per_run

"""The result hub: one client-wide tracker behind every ``task_run.result()`` and ``execute()``.

Web apps await runs one per request handler. Each ``result()`` joins the hub as a *waiter*:
waiters of the same run (same betas and per-call options) share one `Ledger` entry and so one
request at a time; the entry leaves when its last waiter leaves, its open request cancelled at
once. Each waiter keeps its own ``timeout`` and its own cancellation.

Decide-then-act: waiters, answers and outside facts (`ResultHub.observe`, `follow`,
`unfollow`) go into the ledger; `ResultHub._pump` starts *workers* on demand (never more
than ``max_in_flight``, none without work). A worker takes a slot of the client-wide limiter
that fan-outs use too, only then asks the ledger for the next request, sends it, reports the
answer, and goes on while work is left nobody else is about to take. What it sends:

- while the runs fit in the slots, a long-poll of ``/result`` (30 s): a lone waiter learns
  its result within a round trip of completion;
- up to twice as many runs as slots, shorter polls that hand each slot over about every
  second (the ledger's rotation);
- beyond that, a status check (``GET`` the run, answered at once) paced so that each run is
  checked about every ``max(1 s, runs / (4 x slots))`` and a completed one is fetched next:
  a run still going never holds a slot while results of other runs are ready.

Preemption: when a run known to be completed waits for a slot and none is free, the
longest-open long-poll is cut and its run requeued; when other work waits and no hub request
started for a whole second (long-polls opened together hold every slot), one is cut each
second. A cut request costs its connection (aiohttp closes a cancelled request's connection),
so cuts are kept to these two cases. Wake-ups are ``loop.call_later`` handles; nothing runs
when nobody waits, and `aclose` ends every waiter with `ClientClosedError`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from enum import Enum
from typing import TYPE_CHECKING

import anyio

from ._deadline import Deadline, now
from ._errors import ClientClosedError, LedgerError, ParallelError, RunTimeoutError
from ._ledger import LONG_POLL, Action, Emit, Entry, Ledger, Phase, Poll, StopPoll, Wake
from ._models import TaskRun, TaskRunResult
from ._options import RequestOptions
from ._retry import transient_failure

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["ResultHub"]

POLL_INTERVAL = 1
"""Shortest server wait of a poll, seconds (the ledger's rotation unit)."""
FIRST_POLL = 1
"""Server wait of a run's first long-poll, seconds; it doubles after each 408 up to 30 s."""
CHECKS_PER_SLOT = 4.0
"""Status checks per second per slot, at most, while more runs wait than twice the slots."""
PATIENCE = 1.0
"""Seconds work may wait for a slot while no hub request starts, before a long-poll is cut."""
STATUS_REFRESH = 60.0
"""Seconds between status reads of a long-polled run (for a timeout error's ``last_status``)."""

_Key = tuple[str, tuple[str, ...], Hashable]
_Outcome = tuple[TaskRunResult | None, ParallelError | None]


class _Kind(Enum):
    POLL = "poll"  # /result, held up to its wait
    FETCH = "fetch"  # /result of a run known completed: answers at once
    CHECK = "check"  # GET the run's status: answers at once


class _Waiter:
    """One ``result()`` call."""

    __slots__ = ("api_timeout", "deadline", "future")

    def __init__(
        self, future: asyncio.Future[_Outcome], deadline: Deadline, api_timeout: int
    ) -> None:
        self.future = future
        self.deadline = deadline
        self.api_timeout = api_timeout


class _Run:
    """A run as its waiters share it: the payload of its ledger entry."""

    __slots__ = (
        "api_timeout",
        "betas",
        "entry",
        "grow",
        "key",
        "options",
        "run_id",
        "status_read",
        "waiters",
        "wake",
    )

    def __init__(
        self,
        key: _Key,
        run_id: str,
        betas: Sequence[str] | None,
        options: RequestOptions | None,
    ) -> None:
        self.key = key
        self.run_id = run_id
        self.betas = betas
        self.options = options
        self.entry: Entry  # set by the hub right after
        self.waiters: dict[_Waiter, None] = {}  # insertion-ordered set
        self.api_timeout = 1
        self.grow = FIRST_POLL  # slow start: see `ResultHub._plan`
        self.wake: asyncio.TimerHandle | None = None
        self.status_read = -math.inf


class _Open:
    """A hub request on the wire, for `StopPoll` and preemption."""

    __slots__ = ("cut", "entry", "kind", "scope", "started", "wait")

    def __init__(self, entry: Entry, kind: _Kind, wait: int, scope: anyio.CancelScope) -> None:
        self.entry = entry
        self.kind = kind
        self.wait = wait
        self.scope = scope
        self.started = now()
        self.cut = False


class _HubSlot:
    """One worker's permit from the client-wide limiter (the `Slot` of the request path).

    The worker takes it *before* asking the ledger what to send, so a run is polling only
    once its request can go out; the request path releases it after each attempt and takes
    it again for a retry, as for any fan-out request.
    """

    __slots__ = ("_limiter", "held")

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self._limiter = limiter
        self.held = False

    async def acquire(self) -> None:
        if self.held:
            return
        try:
            self._limiter.acquire_on_behalf_of_nowait(self)
        except anyio.WouldBlock:
            await self._limiter.acquire_on_behalf_of(self)
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._limiter.release_on_behalf_of(self)


def _options_key(options: RequestOptions | None) -> Hashable:
    if options is None:
        return None
    headers = tuple(sorted(options.headers.items())) if options.headers else ()
    return headers, options.apply_query("")  # no body: every hub request is a GET


def _fresh(error: ParallelError) -> ParallelError:
    """A copy of ``error`` for one waiter: each raise writes its own traceback into it."""
    copy = type(error).__new__(type(error), *error.args)
    copy.__dict__.update(error.__dict__)
    copy.__cause__ = error.__cause__
    return copy


class ResultHub:
    """The client-wide tracker behind ``result()`` and ``execute()``; see the module doc."""

    def __init__(self, client: AsyncParallel) -> None:
        self._client = client
        self._slots = client.max_in_flight
        self._limiter = client._fanout_slots()
        self._ledger = Ledger(slots=self._slots, poll_interval=POLL_INTERVAL)
        self._ledger.producing = False  # waiters come and go: polls are as long as room allows
        self._runs: dict[_Key, _Run] = {}
        self._open: dict[Entry, _Open] = {}
        self._followed: Counter[str] = Counter()
        self._workers: set[asyncio.Task[None]] = set()
        self._seeking = 0  # workers about to take work (waiting for a slot, or just started)
        self._started = 0  # hub requests started, for the patience check
        self._index = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_handle: asyncio.Handle | None = None
        self._patience: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def waiters(self) -> int:
        """``result()`` calls waiting now."""
        return sum(len(run.waiters) for run in self._runs.values())

    @property
    def workers(self) -> int:
        """Worker tasks alive now (none while nobody waits)."""
        return len(self._workers)

    # --- waiters --------------------------------------------------------------------------------

    async def wait(
        self,
        run_id: str,
        *,
        api_timeout: int,
        timeout: float | None,
        betas: Sequence[str] | None,
        options: RequestOptions | None,
    ) -> TaskRunResult:
        """Wait for ``run_id``'s result with the other waiters of the same run."""
        if self._closed:
            raise ClientClosedError("this AsyncParallel is closed; create a new client")
        run, waiter = self._join(run_id, betas, options, api_timeout, Deadline.after(timeout))
        future = waiter.future
        last_status: str | None = None
        try:
            with anyio.move_on_after(timeout):
                await future
        finally:
            if not future.done() or future.cancelled():  # timed out or cancelled: leave
                last_status = run.entry.status
                self._leave(run, waiter)
        if future.done() and not future.cancelled():
            result, error = future.result()
            if error is not None:
                raise _fresh(error)
            if result is None:  # the ledger emits no empty outcome to a waiter
                raise LedgerError(f"run {run_id} ended with neither result nor error")
            return result
        raise RunTimeoutError(run_id=run_id, last_status=last_status, timeout=timeout)

    def _join(
        self,
        run_id: str,
        betas: Sequence[str] | None,
        options: RequestOptions | None,
        api_timeout: int,
        deadline: Deadline,
    ) -> tuple[_Run, _Waiter]:
        key: _Key = (run_id, tuple(betas or ()), _options_key(options))
        run = self._runs.get(key)
        if run is None:
            run = self._runs[key] = _Run(key, run_id, betas, options)
            follow = self._followed[run_id] > 0
            run.entry = self._ledger.track(next(self._index), run_id, run, deadline, follow=follow)
        waiter = _Waiter(self._get_loop().create_future(), deadline, api_timeout)
        self._ledger.join(run.entry)
        run.waiters[waiter] = None
        self._refresh(run)
        self._schedule_pump()
        return run, waiter

    def _leave(self, run: _Run, waiter: _Waiter) -> None:
        if run.waiters.pop(waiter, False) is False:
            return
        if run.entry.phase is Phase.DONE:
            return
        actions = self._ledger.leave(run.entry)
        if run.waiters:
            self._refresh(run)
        else:
            self._forget(run)
        self._apply(actions)

    def _refresh(self, run: _Run) -> None:
        """The shared entry serves its longest-waiting waiter, and the shortest api_timeout."""
        waiters = run.waiters
        run.entry.deadline = max((w.deadline for w in waiters), key=lambda d: d.at)
        run.api_timeout = min(w.api_timeout for w in waiters)

    def _forget(self, run: _Run) -> None:
        if self._runs.get(run.key) is run:
            del self._runs[run.key]
        if run.wake is not None:
            run.wake.cancel()
            run.wake = None

    # --- facts from outside ---------------------------------------------------------------------

    def observe(self, run: TaskRun) -> None:
        """A run's status learnt elsewhere (a group stream, a webhook).

        A completed run is fetched once (no more polls); a failed or cancelled one ends its
        waiters without a request.
        """
        if self._closed:
            return
        self._apply(self._ledger.observed(run))
        self._schedule_pump()

    def follow(self, run_ids: Iterable[str]) -> None:
        """A stream now tells these runs' ends: stop polling them; `observe` will say.

        Counted: a run followed twice stays followed until unfollowed twice.
        """
        for run_id in run_ids:
            self._followed[run_id] += 1
            if self._followed[run_id] > 1:
                continue
            for entry in list(self._ledger.entries(run_id)):
                new, actions = self._ledger.followed(entry)
                if new is not entry:
                    run: _Run = entry.payload
                    run.entry = new
                    if run.wake is not None:
                        run.wake.cancel()
                        run.wake = None
                self._apply(actions)

    def unfollow(self, run_ids: Iterable[str]) -> None:
        """No stream tells these runs' ends any more: poll them again."""
        for run_id in run_ids:
            left = self._followed[run_id] - 1
            if left > 0:
                self._followed[run_id] = left
                continue
            self._followed.pop(run_id, None)
            self._ledger.not_followed(self._ledger.entries(run_id))
        self._schedule_pump()

    # --- carrying out actions -------------------------------------------------------------------

    def _apply(self, actions: Iterable[Action | None]) -> None:
        for action in actions:
            if action is None:
                continue
            if isinstance(action, Emit):
                self._deliver(action)
            elif isinstance(action, StopPoll):
                self._cut(action.entry)
            elif isinstance(action, Wake):
                self._wake(action)
            else:
                raise LedgerError(f"the hub cannot carry out {action!r} here")

    def _deliver(self, emit: Emit) -> None:
        run: _Run = emit.entry.payload
        self._forget(run)
        outcome: _Outcome = (emit.result, emit.error)
        for waiter in run.waiters:
            if not waiter.future.done():
                waiter.future.set_result(outcome)
        run.waiters.clear()

    def _cut(self, entry: Entry) -> None:
        op = self._open.get(entry)
        if op is not None and not op.cut:
            op.cut = True
            op.scope.cancel()

    def _wake(self, wake: Wake) -> None:
        run: _Run = wake.entry.payload
        if run.wake is not None:
            run.wake.cancel()
        run.wake = self._get_loop().call_later(wake.delay, self._due, wake.entry)

    def _due(self, entry: Entry) -> None:
        run: _Run = entry.payload
        run.wake = None
        if not self._closed:
            self._ledger.due(entry)
            self._pump()

    # --- workers --------------------------------------------------------------------------------

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _schedule_pump(self) -> None:
        # One pump per loop iteration: handlers that join together are counted together, so
        # a burst of waiters does not first get long-polls that must then be cut.
        if self._pump_handle is None and not self._closed:
            self._pump_handle = self._get_loop().call_soon(self._pump)

    def _work(self) -> int:
        counts = self._ledger.counts
        return counts[Phase.QUEUED] + counts[Phase.FETCHING]

    def _pump(self) -> None:
        """Start workers for the work nobody is about to take; cut long-polls that block it."""
        self._pump_handle = None
        if self._closed:
            return
        loop = self._get_loop()
        work = self._work()
        while work > self._seeking and len(self._workers) < self._slots:
            self._seeking += 1
            task = loop.create_task(self._worker())
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
        if work and self._blocked():
            if self._ledger.counts[Phase.FETCHING]:
                self._preempt()  # a result is ready: no run still going may hold it up
            elif self._patience is None:
                self._patience = loop.call_later(PATIENCE, self._impatient, self._started)

    def _blocked(self) -> bool:
        return self._limiter.available_tokens <= 0 or len(self._workers) >= self._slots

    def _impatient(self, started: int) -> None:
        self._patience = None
        if self._closed or not self._work() or not self._blocked():
            return
        if self._started == started:  # no hub request started for a whole PATIENCE
            self._preempt()
        self._patience = self._get_loop().call_later(PATIENCE, self._impatient, self._started)

    def _preempt(self) -> None:
        """Cut the longest-open long-poll (its run goes back in the queue)."""
        polls = [op for op in self._open.values() if op.kind is _Kind.POLL and not op.cut]
        if polls:
            self._cut(min(polls, key=lambda op: op.started).entry)

    async def _worker(self) -> None:
        slot = _HubSlot(self._limiter)
        seeking = True
        try:
            while True:
                await slot.acquire()
                self._seeking -= 1
                seeking = False
                if self._closed:
                    return
                action = self._ledger.next_poll(now())
                if action is None:
                    return
                if isinstance(action, Emit):
                    self._deliver(action)
                else:
                    self._started += 1
                    try:
                        await self._carry(action, slot)
                    finally:
                        slot.release()
                if self._work() <= self._seeking:
                    self._pump()  # cuts, if work is blocked
                    return
                self._seeking += 1
                seeking = True
                self._pump()
        finally:
            slot.release()
            if seeking:
                self._seeking -= 1

    def _plan(self, poll: Poll) -> tuple[_Kind, int]:
        entry = poll.entry
        if entry.status == "completed":
            return _Kind.FETCH, poll.wait
        if self._active() > 2 * self._slots:
            return _Kind.CHECK, 0
        # Slow start: a run's long-polls grow 1, 2, 4... to 30 s. A lone waiter loses nothing
        # (any open poll answers at completion), and while waiters keep arriving the slots
        # turn over by themselves instead of being held 30 s and then cut.
        run: _Run = entry.payload
        return _Kind.POLL, min(poll.wait, run.api_timeout, run.grow)

    def _active(self) -> int:
        c = self._ledger.counts
        return c[Phase.QUEUED] + c[Phase.FETCHING] + c[Phase.POLLING] + c[Phase.BACKOFF]

    def _check_delay(self, elapsed: float) -> float:
        period = max(float(POLL_INTERVAL), self._active() / (CHECKS_PER_SLOT * self._slots))
        return max(0.0, period - elapsed)

    async def _carry(self, poll: Poll, slot: _HubSlot) -> None:
        """Send ``poll``'s request (a poll, fetch or status check) and report the answer."""
        entry = poll.entry
        run: _Run = entry.payload
        kind, wait = self._plan(poll)
        entry.asked = wait
        task_run = self._client.task_run
        deadline = entry.deadline.as_float()
        result: TaskRunResult | None = None
        status: str | None = None
        seen: TaskRun | None = None
        error: ParallelError | None = None
        elapsed = 0.0
        with anyio.CancelScope() as scope:
            op = self._open[entry] = _Open(entry, kind, wait, scope)
            try:
                if kind is _Kind.CHECK:
                    seen = await task_run._status_after_404(
                        run.run_id, deadline, slot, options=run.options
                    )
                else:
                    result, status = await task_run._poll(
                        run.run_id, wait, run.betas, deadline, slot, options=run.options
                    )
                    elapsed = now() - op.started
                    if result is None and status is None and kind is _Kind.POLL:
                        seen = await self._read_status(run, slot)
            except ParallelError as exc:
                error = exc
            finally:
                del self._open[entry]
        if self._closed or entry.phase is not Phase.POLLING:  # stopped: it ended meanwhile
            return
        at = now()
        ledger = self._ledger
        fact: Emit | Wake | None
        if scope.cancelled_caught:
            fact = ledger.poll_cut(entry, at)
        elif error is not None:
            fact = ledger.poll_failed(entry, error, transient=transient_failure(error))
        elif result is not None:
            fact = ledger.answered(entry, result)
        elif seen is not None and (kind is _Kind.CHECK or seen.is_terminal):
            fact = ledger.checked(entry, seen, self._check_delay(now() - op.started), at)
        else:
            if seen is not None or status is not None:
                entry.status = seen.status if seen is not None else status
            if kind is _Kind.POLL and elapsed >= wait / 2:  # it held: next time, longer
                run.grow = min(LONG_POLL, 2 * run.grow)
            fact = ledger.still_running(entry, elapsed, at)
        self._apply((fact,))

    async def _read_status(self, run: _Run, slot: _HubSlot) -> TaskRun | None:
        """After a 408, the run's status now and then (a 408 carries none); never raises."""
        if now() - run.status_read < STATUS_REFRESH:
            return None
        run.status_read = now()
        try:
            return await self._client.task_run._status_after_404(
                run.run_id, run.entry.deadline.as_float(), slot, options=run.options
            )
        except ParallelError:
            return None

    # --- lifecycle ------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """End every waiter with `ClientClosedError` and stop every request. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for handle in (self._pump_handle, self._patience):
            if handle is not None:
                handle.cancel()
        for run in list(self._runs.values()):
            closed = ClientClosedError(
                f"the client was closed while waiting for run {run.run_id}'s result"
            )
            self._forget(run)
            for waiter in run.waiters:
                if not waiter.future.done():
                    waiter.future.set_result((None, closed))
            run.waiters.clear()
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)

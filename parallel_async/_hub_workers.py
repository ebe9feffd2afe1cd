"""The result hub's request side: workers on the client-wide slots, and what they send.

Decide-then-act. `Workers.pump` (synchronous, after each fact) starts workers for the work
nobody is about to take, never more than ``max_in_flight`` and none without work. A worker
takes a slot of the client's limiter (shared with every fan-out of the client), only then
asks the ledger for the next request, sends it, reports the answer as a ledger fact, and goes
on while there is more work than other workers are about to take. What it sends:

- while the runs fit in the slots, a long-poll of ``/result`` whose wait starts at 1 s and
  doubles after each 408 up to 30 s (slow start: while waiters keep arriving, slots turn over
  by themselves instead of being held 30 s and then cut; a lone waiter loses nothing, as any
  open poll answers at completion);
- up to twice as many runs as slots, the ledger's rotation: polls short enough that each
  slot is handed over about every second;
- beyond that, a status check (``GET`` the run, answered at once) paced to one per run about
  every ``max(1 s, runs / (4 x slots))``; a run found completed is fetched next. A run still
  going never holds a slot while other runs' results are ready;
- for a run whose webhook is late (``Target.check_every``: the client's ``webhooks.poll_after``
  passed), a status check every ``check_every`` s, never a poll: its webhook is only due once
  the run has ended, and a check that finds it ended fetches the result at once.

Preemption: when a run known to be completed waits for a slot and none is free, the
longest-open long-poll is cut and its run requeued; when other work waits and no hub request
started for a whole second (long-polls opened together hold every slot), one is cut per
second. A cut costs a connection (aiohttp closes a cancelled request's connection), hence
these two cases only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Protocol

import anyio
import msgspec

from ._deadline import now
from ._defaults import (
    HUB_CHECKS_PER_SLOT,
    HUB_FIRST_POLL,
    HUB_PATIENCE,
    LONG_POLL,
    POLL_INTERVAL,
    STATUS_REFRESH,
)
from ._errors import ParallelError
from ._ledger import Action, Emit, Entry, Ledger, Phase, Poll, Wake
from ._models import TaskRun, TaskRunResult
from ._options import RequestOptions
from ._retry import transient_failure

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["FIRST_POLL", "POLL_INTERVAL", "Target", "Workers", "new_ledger"]

FIRST_POLL = HUB_FIRST_POLL  # a module name of its own: tests patch it
CHECKS_PER_SLOT = HUB_CHECKS_PER_SLOT
PATIENCE = HUB_PATIENCE


class Target(Protocol):
    """What a request needs of a tracked run (the payload of its ledger entry)."""

    run_id: str
    betas: Sequence[str] | None
    options: RequestOptions | None
    api_timeout: int  # the shortest of its waiters'
    grow: int  # its next long-poll's wait (slow start)
    status_read: float  # when its status was last read
    check_every: float | None  # a webhook still expected: status checks this often, no polls


class _Kind(Enum):
    POLL = "poll"  # /result, held up to its wait
    FETCH = "fetch"  # /result of a run known completed: answers at once
    CHECK = "check"  # GET the run's status: answers at once


class _Open:
    """A hub request on the wire (for `StopPoll` and preemption), then its answer."""

    __slots__ = (
        "cut",
        "elapsed",
        "entry",
        "error",
        "kind",
        "result",
        "scope",
        "seen",
        "started",
        "status",
        "wait",
    )

    def __init__(self, entry: Entry, kind: _Kind, wait: int, scope: anyio.CancelScope) -> None:
        self.entry = entry
        self.kind = kind
        self.wait = wait
        self.scope = scope
        self.started = now()
        self.cut = False
        self.result: TaskRunResult | None = None
        self.status: str | None = None  # after a 404: the run's status
        self.seen: TaskRun | None = None  # a status check's (or read's) answer
        self.error: ParallelError | None = None
        self.elapsed = 0.0  # how long the /result request took


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
            pass  # awaited below: no WouldBlock in a cancellation's traceback
        else:
            self.held = True
            return
        await self._limiter.acquire_on_behalf_of(self)
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._limiter.release_on_behalf_of(self)


class Workers:
    """The hub's workers. ``apply`` carries out ledger actions (the hub's), ``crash`` is told
    of a bug; ``ledger`` may be replaced (after a crash) while no worker runs."""

    def __init__(
        self,
        client: AsyncParallel,
        ledger: Ledger,
        apply: Callable[[Iterable[Action | None]], None],
        crash: Callable[[Exception], None],
    ) -> None:
        self.ledger = ledger
        self.closed = False
        self._client = client
        self._apply = apply
        self._crash = crash
        self._slots = client.max_in_flight
        self._limiter = client._fanout_slots()
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: dict[Entry, _Open] = {}
        self._seeking = 0  # workers about to take work (waiting for a slot, or just started)
        self._started = 0  # requests started, for the patience check
        self._patience: asyncio.TimerHandle | None = None
        self.checking = 0  # tracked runs in webhook-check mode (the hub counts them)

    def __len__(self) -> int:
        return len(self._tasks)

    def cut(self, entry: Entry) -> None:
        """Cancel the request open for ``entry``, if any (its connection closes)."""
        op = self._open.get(entry)
        if op is not None and not op.cut:
            op.cut = True
            op.scope.cancel()

    def cancel_others(self) -> None:
        """Cancel every worker but the current task (a crash, or closing)."""
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    async def aclose(self) -> None:
        """Stop every worker and wait for them."""
        self.closed = True
        if self._patience is not None:
            self._patience.cancel()
        tasks = list(self._tasks)
        self.cancel_others()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- starting workers -----------------------------------------------------------------------

    def _work(self) -> int:
        counts = self.ledger.counts
        return counts[Phase.QUEUED] + counts[Phase.FETCHING]

    def pump(self) -> None:
        """Start workers for the work nobody is about to take; cut long-polls that block it."""
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        work = self._work()
        while work > self._seeking and len(self._tasks) < self._slots:
            self._seeking += 1
            task = loop.create_task(self._worker())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if work and self._blocked():
            if self.ledger.counts[Phase.FETCHING]:
                self._preempt()  # a result is ready: no run still going may hold it up
            elif self._patience is None:
                self._patience = loop.call_later(PATIENCE, self._impatient, self._started)

    def _blocked(self) -> bool:
        return self._limiter.available_tokens <= 0 or len(self._tasks) >= self._slots

    def _impatient(self, started: int) -> None:
        self._patience = None
        if self.closed or not self._work() or not self._blocked():
            return
        if self._started == started:  # no hub request started for a whole PATIENCE
            self._preempt()
        self._patience = asyncio.get_running_loop().call_later(
            PATIENCE, self._impatient, self._started
        )

    def _preempt(self) -> None:
        """Cut the longest-open long-poll (its run goes back in the queue)."""
        polls = [op for op in self._open.values() if op.kind is _Kind.POLL and not op.cut]
        if polls:
            self.cut(min(polls, key=lambda op: op.started).entry)

    # --- one worker -----------------------------------------------------------------------------

    async def _worker(self) -> None:
        slot = _HubSlot(self._limiter)
        seeking = True  # counted in ``_seeking`` until it holds a slot
        try:
            while True:
                await slot.acquire()
                self._seeking -= 1
                seeking = False
                if self.closed or not await self._step(slot):
                    return
                if self._work() <= self._seeking:  # others are about to take what is left
                    self.pump()  # (cuts a long-poll, if work is blocked)
                    return
                self._seeking += 1
                seeking = True
                self.pump()
        except Exception as exc:  # a bug: the hub tells every waiter, none hangs
            self._crash(exc)
        finally:
            slot.release()
            if seeking:
                self._seeking -= 1

    async def _step(self, slot: _HubSlot) -> bool:
        """Carry out the ledger's next request (holding ``slot``); False when there is none."""
        action = self.ledger.next_poll(now())
        if action is None:
            return False
        if isinstance(action, Emit):  # its deadline passed while it was queued
            self._apply((action,))
            return True
        self._started += 1
        try:
            await self._carry(action, slot)
        finally:
            slot.release()
        return True

    def _plan(self, poll: Poll) -> tuple[_Kind, int]:
        entry = poll.entry
        if entry.status == "completed":
            return _Kind.FETCH, poll.wait
        target: Target = entry.payload
        if target.check_every is not None or self._active() > 2 * self._slots:
            return _Kind.CHECK, 0
        return _Kind.POLL, min(poll.wait, target.api_timeout, target.grow)

    def _active(self) -> int:
        """Runs competing for the slots; those checked for a late webhook hardly do."""
        c = self.ledger.counts
        active = c[Phase.QUEUED] + c[Phase.FETCHING] + c[Phase.POLLING] + c[Phase.BACKOFF]
        return max(0, active - self.checking)

    def _check_delay(self, target: Target, elapsed: float) -> float:
        if target.check_every is not None:
            period = target.check_every
        else:
            period = max(float(POLL_INTERVAL), self._active() / (CHECKS_PER_SLOT * self._slots))
        return max(0.0, period - elapsed)

    async def _carry(self, poll: Poll, slot: _HubSlot) -> None:
        """Send ``poll``'s request (a poll, fetch or status check) and report the answer."""
        entry = poll.entry
        kind, wait = self._plan(poll)
        entry.asked = wait
        with anyio.CancelScope() as scope:
            op = self._open[entry] = _Open(entry, kind, wait, scope)
            try:
                await self._send(op, slot)
            except ParallelError as exc:
                op.error = exc
            finally:
                del self._open[entry]
        if not self.closed and entry.phase is Phase.POLLING:  # else it ended meanwhile
            self._apply((self._report(op, cut=scope.cancelled_caught),))

    async def _send(self, op: _Open, slot: _HubSlot) -> None:
        target: Target = op.entry.payload
        task_run = self._client.task_run
        deadline = op.entry.deadline.as_float()
        if op.kind is _Kind.CHECK:
            op.seen = await task_run._status_after_404(
                target.run_id, deadline, slot, options=target.options
            )
            return
        op.result, op.status = await task_run._poll(
            target.run_id, op.wait, target.betas, deadline, slot, options=target.options
        )
        op.elapsed = now() - op.started
        if op.result is None and op.status is None and op.kind is _Kind.POLL:
            op.seen = await self._read_status(op.entry, slot)  # a 408 carries no status

    async def _read_status(self, entry: Entry, slot: _HubSlot) -> TaskRun | None:
        """The run's status now and then (every ``STATUS_REFRESH``); never raises."""
        target: Target = entry.payload
        if now() - target.status_read < STATUS_REFRESH:
            return None
        target.status_read = now()
        try:
            return await self._client.task_run._status_after_404(
                target.run_id, entry.deadline.as_float(), slot, options=target.options
            )
        except ParallelError:
            return None

    def _report(self, op: _Open, *, cut: bool) -> Emit | Wake | None:
        """The ledger fact of ``op``'s answer."""
        entry, ledger, at = op.entry, self.ledger, now()
        if cut:
            return ledger.poll_cut(entry, at)
        if op.error is not None:
            return ledger.poll_failed(entry, op.error, transient=transient_failure(op.error))
        if op.result is not None:
            return ledger.answered(entry, op.result)
        seen = op.seen
        if seen is not None and (op.kind is _Kind.CHECK or seen.is_terminal):
            if entry.status == "completed" and not seen.is_terminal:
                # a webhook (or stream) said completed while this check was on the wire
                seen = msgspec.structs.replace(seen, status="completed", is_active=False)
            delay = self._check_delay(entry.payload, at - op.started)
            return ledger.checked(entry, seen, delay, at)
        if seen is not None or op.status is not None:
            ledger.saw_status(entry, seen.status if seen is not None else op.status)
        if op.kind is _Kind.POLL and op.elapsed >= op.wait / 2:  # it held: next time, longer
            target: Target = entry.payload
            target.grow = min(LONG_POLL, 2 * target.grow)
        return ledger.still_running(entry, op.elapsed, at)


def new_ledger(slots: int) -> Ledger:
    """The hub's ledger: waiters come and go, so polls are as long as room allows."""
    ledger = Ledger(slots=slots, poll_interval=POLL_INTERVAL)
    ledger.producing = False
    return ledger

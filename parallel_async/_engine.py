"""The fan-out engine's I/O side: poll workers that carry out what the run ledger decides.

A fixed pool of poll workers (as many as the client's ``max_in_flight``) asks the `Ledger` for
the next request (a fetch of a finished run before any poll; a run past its deadline comes back
as its timeout instead), sends it under one of the client-wide slots, and reports the answer as
a fact. The ledger's actions are carried out here: outcomes go to the `OutcomeChannel`, pauses
become timers, and a poll whose run was settled meanwhile is cancelled. Memory for tasks stays
O(max_in_flight); the ledger forgets each run as soon as its outcome is out.

The strategies build on this: rotation over ``/result`` (`_fanout`) and a task group's event
stream (`_group_tracking`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import anyio
import msgspec

from ._deadline import Deadline, Scope, check_seconds
from ._defaults import FANOUT_POLL_INTERVAL as DEFAULT_POLL_INTERVAL
from ._defaults import PACE
from ._errors import (
    ClientClosedError,
    InvalidArgumentError,
    LedgerError,
    ParallelError,
    RunTimeoutError,
)
from ._ledger import Emit, Entry, Ledger, Phase, Poll, StopPoll, Wake
from ._models import TaskRun, TaskRunResult
from ._outcomes import Completed, Failed, Outcome, OutcomeChannel
from ._progress import ProgressCallback, ProgressTracker
from ._retry import transient_failure
from ._task_run import LONG_POLL_READ_MARGIN
from ._typed import OutputValidationError, parse_output

if TYPE_CHECKING:
    from ._client import AsyncParallel
    from ._ledger import Action

__all__ = ["DEFAULT_POLL_INTERVAL", "Engine", "FanoutOptions", "aiter_any", "outcome_buffer"]


class FanoutOptions(msgspec.Struct, frozen=True, kw_only=True):
    """The arguments every fan-out shares; see `AsyncParallel.as_completed`."""

    timeout: float | None = None
    run_timeout: float | None = None
    poll_interval: int = DEFAULT_POLL_INTERVAL
    fail_fast: bool = False
    progress: ProgressCallback | None = None
    betas: Sequence[str] | None = None
    order: str = "completed"

    def check(self) -> None:
        """Refuse bad values before any request."""
        if self.order not in ("completed", "input"):
            raise InvalidArgumentError(f"order must be 'completed' or 'input', got {self.order!r}")
        check_seconds("timeout", self.timeout)
        check_seconds("run_timeout", self.run_timeout)
        p = self.poll_interval
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise InvalidArgumentError("poll_interval must be a whole number of seconds >= 1")


def outcome_buffer(client: AsyncParallel) -> int:
    """Outcomes held for a consumer that is behind, before the engine waits for it."""
    return max(1024, 4 * client.max_in_flight)


class _Slots:
    """The client-wide fan-out slots, counted in this fan-out's progress.

    Passed down to the request path, which holds a slot only while a request is open: never
    while waiting for the create limiter or between retries.
    """

    __slots__ = ("_limiter", "_progress")

    def __init__(self, limiter: anyio.CapacityLimiter, progress: ProgressTracker) -> None:
        self._limiter = limiter
        self._progress = progress

    async def acquire(self) -> None:
        try:
            self._limiter.acquire_nowait()
        except anyio.WouldBlock:
            pass  # awaited below: no WouldBlock in the traceback of a cancellation
        else:
            self._progress.in_flight += 1
            return
        await self._limiter.acquire()
        self._progress.in_flight += 1

    def release(self) -> None:
        self._progress.in_flight -= 1
        self._limiter.release()

    def others_waiting(self) -> int:
        """Requests queued for the client-wide slots right now."""
        if self._limiter.available_tokens > 0:
            return 0  # a free slot: nobody waits (and no statistics object to build)
        return self._limiter.statistics().tasks_waiting


class Engine:
    """One fan-out: a ledger, poll workers, and the channel its outcomes leave by."""

    def __init__(
        self,
        client: AsyncParallel,
        options: FanoutOptions,
        *,
        total: int | None,
        output_type: Any = None,
    ) -> None:
        options.check()
        client._open()
        self._client = client
        self._options = options
        self._output_type = output_type
        self.channel = OutcomeChannel(
            outcome_buffer(client), fail_fast=options.fail_fast, in_order=options.order == "input"
        )
        self._run_timeout = options.run_timeout
        self.deadline = Deadline.after(options.timeout, Scope.FANOUT)
        self._betas = options.betas
        self.ledger = Ledger(
            slots=client.max_in_flight, poll_interval=options.poll_interval, pace=PACE
        )
        self.progress = ProgressTracker(
            options.progress,
            total,
            on_error=self.abort,
            states=lambda: (self.ledger.queued, self.ledger.running),
        )
        self._slot = _Slots(client._fanout_slots(), self.progress)
        self._idle: deque[asyncio.Future[None]] = deque()  # workers waiting for work
        self._polls: dict[Entry, anyio.CancelScope] = {}
        self._pending: deque[Action] = deque()  # from facts reported outside a task (webhooks)
        client._watchers.add(self)  # run statuses learnt elsewhere (webhooks) reach it; `close`
        self._closed = False
        self.outstanding = 0  # inputs read (or runs given) without an outcome yet

    # --- lifecycle ------------------------------------------------------------------------------

    def abort(self, error: BaseException) -> None:
        """End the fan-out now; ``error`` escapes the ``async with`` block as itself."""
        self.ledger.producing = False
        self.close()
        self.channel.abort(error)

    def observe(self, run: TaskRun) -> None:
        """A run's status learnt outside our requests (a webhook): a finished run is fetched
        (or ends) without waiting for its next poll. Carried out by a worker."""
        if self._closed or not self.ledger.entries(run.run_id):
            return
        for action in self.ledger.observed(run):
            if isinstance(action, StopPoll):
                scope = self._polls.get(action.entry)
                if scope is not None:
                    scope.cancel()
            else:
                self._pending.append(action)
        self.wake_workers()

    def close(self) -> None:
        """Stop the workers (idle and future ones return)."""
        self._client._watchers.discard(self)
        self._closed = True
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)

    @property
    def producing(self) -> bool:
        """More runs may still be added."""
        return self.ledger.producing

    def producing_done(self) -> None:
        """No more runs will be added."""
        self.ledger.producing = False
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.outstanding == 0 and not self.ledger.producing:
            self.close()
            self.channel.finish()  # every outcome is out: the consumer's iteration ends

    def run_deadline(self) -> Deadline:
        """A new run's deadline: its own ``run_timeout`` from now, within the fan-out's."""
        own = Deadline.after(self._run_timeout, Scope.RUN)
        return self.deadline.earliest(own) if own.at >= self.deadline.at else own

    # --- carrying out the ledger's actions ------------------------------------------------------

    async def act(self, actions: Sequence[Action] | Action | None) -> None:
        """Carry out what the ledger decided."""
        if actions is None:
            return
        if not isinstance(actions, Sequence) or isinstance(actions, tuple):
            actions = [cast("Action", actions)]
        for action in actions:
            if isinstance(action, Emit):
                await self.emit(action.entry, action.result, action.error)
            elif isinstance(action, Wake):
                asyncio.get_running_loop().call_later(action.delay, self._due, action.entry)
            elif isinstance(action, StopPoll):
                scope = self._polls.get(action.entry)
                if scope is not None:
                    scope.cancel()
        self.wake_workers()

    def _due(self, entry: Entry) -> None:
        if not self._closed:
            self.ledger.due(entry)
            self.wake_workers()

    def wake_workers(self) -> None:
        """Wake one idle worker per request ready to go."""
        work = len(self._pending) + self.ledger.counts[Phase.QUEUED]
        work += self.ledger.counts[Phase.FETCHING]
        while work > 0 and self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                work -= 1

    async def emit(
        self, entry: Entry, result: TaskRunResult | None, error: ParallelError | None
    ) -> None:
        """Hand one run's outcome to the consumer (the ledger has already marked it done)."""
        if isinstance(error, ClientClosedError) and self._client._closing.closed:
            self.abort(error)  # the client was closed: the fan-out ends, not each run
            return
        if error is not None and self._options.fail_fast:
            self.abort(error)
            return
        parsed = None
        if result is not None and self._output_type is not None:
            try:
                parsed = parse_output(result, self._output_type)
            except OutputValidationError as exc:
                result, error = None, exc
        progress = self.progress
        if error is None:
            progress.completed += 1
        elif isinstance(error, RunTimeoutError):
            progress.timed_out += 1
        else:
            progress.failed += 1
        progress.notify()
        outcome: Outcome[Any, Any]
        if error is None and result is not None:
            outcome = Completed(
                run_id=result.run.run_id if entry.run_id is None else entry.run_id,
                index=entry.index,
                result=result,
                input=entry.payload,
                parsed=parsed,
            )
        else:
            outcome = Failed(
                run_id=entry.run_id,
                index=entry.index,
                error=error if error is not None else LedgerError("no result and no error"),
                input=entry.payload,
            )
        entry.payload = None  # the outcome holds the input now
        await self.channel.send(outcome)
        self.outstanding -= 1
        self._maybe_finish()

    async def fail_input(self, index: int, payload: Any, error: ParallelError) -> None:
        """An input that never became a run (a bad input, a create that failed for good)."""
        entry = self.ledger.creating(index, payload)
        await self.act(self.ledger.create_failed(entry, error))

    # --- polling --------------------------------------------------------------------------------

    async def _next(self) -> Poll | None:
        """The next request to send, waiting for one; ``None`` once the fan-out is over."""
        while not self._closed:
            while self._pending:
                await self.act(self._pending.popleft())
            self.ledger.others_waiting = self._slot.others_waiting()
            action = self.ledger.next_poll(time.monotonic())
            if isinstance(action, Poll):
                return action
            if action is not None:  # a run whose deadline passed while it queued
                await self.act(action)
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self.wake_workers()  # we were woken but are leaving: pass it on
                raise
        return None

    async def poll_worker(self) -> None:
        """Send the ledger's polls, one request at a time, until the fan-out is over."""
        ledger = self.ledger
        while (poll := await self._next()) is not None:
            entry = poll.entry
            started = time.monotonic()
            remaining = entry.deadline.remaining(started)
            result: TaskRunResult | None = None
            status: str | None = None
            error: ParallelError | None = None
            with anyio.CancelScope() as scope:
                if remaining < poll.wait + LONG_POLL_READ_MARGIN + 1:
                    scope.deadline = anyio.current_time() + remaining  # cut at the deadline
                self._polls[entry] = scope
                try:
                    result, status = await self._client.task_run._poll(
                        cast(str, entry.run_id),
                        poll.wait,
                        self._betas,
                        entry.deadline.as_float(),
                        self._slot,
                        watch_close=False,  # `end_on_close` ends the whole fan-out instead
                    )
                except ParallelError as exc:
                    error = exc
            del self._polls[entry]
            if entry.phase is not Phase.POLLING:
                continue  # settled while the poll was open (an event, the deadline sweep)
            now = time.monotonic()
            if scope.cancelled_caught:
                await self.act(ledger.poll_cut(entry, now))
            elif error is not None:
                await self.act(ledger.poll_failed(entry, error, transient=transient_failure(error)))
            elif result is not None:
                await self.act(ledger.answered(entry, result))
            elif status is not None:  # a 404 whose status read said it is still going
                ledger.requeue(entry, status)
                self.wake_workers()
            else:
                await self.act(ledger.still_running(entry, now - started, now))

    async def end_on_close(self) -> None:
        """Closing the client ends the fan-out at once, `ClientClosedError` escaping its block
        (outcomes already delivered stay delivered; runs still going go on server-side)."""
        closing = self._client._closing
        await closing.wait()
        self.abort(closing.error("the fan-out"))

    async def sweep_deadlines(self) -> None:
        """End runs whose deadline passed as timeout outcomes, wherever they are."""
        ledger = self.ledger
        while self.outstanding > 0 or ledger.producing:
            await self.act(ledger.expire(time.monotonic()))
            nxt = ledger.next_deadline()
            if nxt is None:
                await anyio.sleep(0.5)  # no deadline yet: look again when runs arrive
            else:
                await anyio.sleep(max(0.0, nxt - time.monotonic()) + 0.001)


async def aiter_any(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    """Iterate a sync or async iterable."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item

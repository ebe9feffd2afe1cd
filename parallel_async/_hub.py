"""The result hub: one client-wide tracker behind every ``task_run.result()`` and ``execute()``.

Web apps await runs one per request handler. Each ``result()`` joins the hub as a *waiter*:
waiters of the same run (same betas and per-call options) share one `Ledger` entry, so one
request at a time; the entry leaves the ledger when its last waiter leaves, its open request
cancelled at once. Each waiter keeps its own ``timeout`` and its own cancellation (a handler
cancelled by a client disconnect leaves the others untouched).

Facts go into the ledger (waiters joining and leaving here; answers from the workers of
``_hub_workers``, which decide what to send; `ResultHub.observe`, `follow` and `unfollow`
from outside: a group stream, a webhook); the actions it returns are carried out here
(outcomes handed to waiters, requests cut, wake-ups as ``loop.call_later`` handles). Nothing
runs while nobody waits, and `aclose` ends every waiter with `ClientClosedError`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING

import anyio

from . import _hub_workers
from ._deadline import Deadline
from ._errors import ClientClosedError, LedgerError, ParallelError, RunTimeoutError
from ._hub_workers import Workers, new_ledger
from ._ledger import Action, Emit, Entry, Phase, StopPoll, Wake
from ._models import TaskRun, TaskRunResult
from ._options import RequestOptions

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["ResultHub"]

_Key = tuple[str, tuple[str, ...], Hashable]
_Outcome = tuple[TaskRunResult | None, ParallelError | None]


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
    """A run as its waiters share it: the payload of its ledger entry (a `Target`)."""

    __slots__ = (
        "api_timeout",
        "betas",
        "check_every",
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
        self.grow = _hub_workers.FIRST_POLL  # slow start (read at creation: tests pin it)
        self.wake: asyncio.TimerHandle | None = None
        self.status_read = -math.inf
        self.check_every: float | None = None  # a webhook still expected: checks, no polls


def _options_key(options: RequestOptions | None) -> Hashable:
    if options is None:
        return None
    headers = tuple(sorted(options.headers.items())) if options.headers else ()
    return headers, options.apply_query("")  # no body: every hub request is a GET


def _fresh(error: ParallelError) -> ParallelError:
    """A copy of ``error`` for one waiter: each raise writes its own traceback into it."""
    copy = type(error).__new__(type(error), *error.args)
    # OSError's __new__ (TimeoutError's) leaves args empty when a subclass has its own
    # __init__, which is skipped here: without this, a copied timeout had no message
    copy.args = error.args
    copy.__dict__.update(error.__dict__)
    copy.__cause__ = error.__cause__
    return copy


class ResultHub:
    """The client-wide tracker behind ``result()`` and ``execute()``; see the module doc."""

    def __init__(self, client: AsyncParallel) -> None:
        self._slots = client.max_in_flight
        self._ledger = new_ledger(self._slots)
        self._workers = Workers(client, self._ledger, self._apply, self._crash)
        self._runs: dict[_Key, _Run] = {}
        self._followed: Counter[str] = Counter()
        self._index = itertools.count()
        self._pump_handle: asyncio.Handle | None = None
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
        if future.done() and not future.cancelled():  # (a result wins a tie with the timeout)
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
        waiter = _Waiter(asyncio.get_running_loop().create_future(), deadline, api_timeout)
        self._ledger.join(run.entry)
        run.waiters[waiter] = None
        self._refresh(run)
        self._schedule_pump()
        return run, waiter

    def _leave(self, run: _Run, waiter: _Waiter) -> None:
        if run.waiters.pop(waiter, False) is False or run.entry.phase is Phase.DONE:
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
        if run.check_every is not None:
            run.check_every = None
            self._workers.checking -= 1

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

    def unfollow(self, run_ids: Iterable[str], *, check_every: float | None = None) -> None:
        """No stream tells these runs' ends any more: poll them again.

        With ``check_every`` (a webhook is late, but may still come), their waiters do not
        poll: the run's status is checked every ``check_every`` s, and once it has ended
        (its webhook overdue) the result is fetched, or the failure told, at once.
        """
        for run_id in run_ids:
            if check_every is not None:
                for entry in self._ledger.entries(run_id):
                    run: _Run = entry.payload
                    if run.check_every is None:
                        self._workers.checking += 1
                    run.check_every = check_every
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
                self._workers.cut(action.entry)
            elif isinstance(action, Wake):
                self._wake(action)
            else:
                raise LedgerError(f"the hub cannot carry out {action!r} here")

    def _deliver(self, emit: Emit) -> None:
        run: _Run = emit.entry.payload
        self._forget(run)
        self._settle(run, (emit.result, emit.error))

    @staticmethod
    def _settle(run: _Run, outcome: _Outcome) -> None:
        for waiter in run.waiters:
            if not waiter.future.done():
                waiter.future.set_result(outcome)
        run.waiters.clear()

    def _wake(self, wake: Wake) -> None:
        run: _Run = wake.entry.payload
        if run.wake is not None:
            run.wake.cancel()
        run.wake = asyncio.get_running_loop().call_later(wake.delay, self._due, wake.entry)

    def _due(self, entry: Entry) -> None:
        run: _Run = entry.payload
        run.wake = None
        if not self._closed:
            self._ledger.due(entry)
            self._workers.pump()

    def _schedule_pump(self) -> None:
        # One pump per loop iteration: handlers that join together are counted together.
        if self._pump_handle is None and not self._closed:
            self._pump_handle = asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_handle = None
        self._workers.pump()

    def _crash(self, exc: Exception) -> None:
        """A bug in a worker: every waiter gets it as a `LedgerError`; start over afresh."""
        error = exc if isinstance(exc, LedgerError) else LedgerError(f"result hub bug: {exc!r}")
        if error is not exc:
            error.__cause__ = exc
        self._workers.cancel_others()
        self._end_all(error)
        self._ledger = self._workers.ledger = new_ledger(self._slots)

    def _end_all(self, error: ParallelError) -> None:
        for run in list(self._runs.values()):
            self._forget(run)
            self._settle(run, (None, error))

    # --- lifecycle ------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """End every waiter with `ClientClosedError` and stop every request. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pump_handle is not None:
            self._pump_handle.cancel()
        self._end_all(ClientClosedError("the client was closed while waiting for a run's result"))
        await self._workers.aclose()

"""Group-driven tracking: learn completions from one task-group event stream.

Instead of holding a long-poll per run, ``map`` creates its runs inside a task group (in
requests of up to 1,000) and follows the group's event stream on one connection. A run that
completed is queued for its result (fetched by the same poll workers as the long-poll
strategy, at most ``max_in_flight`` at a time, answering at once); a failed or cancelled run
ends from the event itself. Connections: ``max_in_flight`` for requests plus one stream.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from ._errors import (
    AddRunsError,
    InvalidArgumentError,
    ParallelError,
    RunCancelledError,
    RunFailedError,
    RunTimeoutError,
    TransportTimeoutError,
)
from ._events import TaskGroupStatusEvent, TaskRunStateEvent
from ._fanout import (
    FanoutOptions,
    _body_for,
    _Engine,
    _Run,
    check_run_ids,
    map_setup,
)
from ._models import RunInput
from ._outcomes import Outcomes, serve
from ._protocol import spec_chars, validate_id
from ._streams import group_event_stream
from ._task_group import MAX_RUNS_PER_ADD, TAG_KEY

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["as_completed_group", "map_group"]

BATCH_LINGER = 0.2
"""Seconds a partial batch waits for more inputs before it is sent anyway."""
_SETTLING = frozenset({"completed", "failed", "cancelled", "polling"})  # outcome on its way
STREAM_FAILURES_BEFORE_POLLING = 3
"""Consecutive failed stream connections after which outstanding runs are polled instead."""


class _GroupEngine(_Engine):
    """The fan-out engine fed by a group's event stream instead of rotation."""

    def __init__(
        self,
        client: AsyncParallel,
        group_id: str | None,
        options: FanoutOptions,
        *,
        total: int | None,
        output_type: Any = None,
    ) -> None:
        super().__init__(client, options, total=total, output_type=output_type)
        self._group_id = group_id
        self._runs: dict[str, list[_Run]] = {}  # a run id may be passed more than once
        self._early: dict[str, TaskRunStateEvent] = {}  # events that beat add_runs' answer
        self._by_deadline: deque[_Run] = deque()
        self._registered = anyio.Event()
        self._added = anyio.Event()  # set when a batch of runs joins the group
        # runs whose add answer was lost and could not be reconciled:
        # tag -> (run, the add's error, when its answer was lost)
        self._unresolved: dict[str, tuple[_Run, ParallelError, float]] = {}
        self._pending_errors: deque[tuple[_Run, ParallelError]] = deque()

    def register(self, run: _Run) -> None:
        """Start tracking a created run (its terminal event may already have arrived)."""
        assert run.run_id is not None  # noqa: S101 - only created runs are registered
        self._runs.setdefault(run.run_id, []).append(run)
        self._by_deadline.append(run)
        self._progress.created += 1
        early = self._early.pop(run.run_id, None)
        if early is not None:
            self._on_terminal(run, early)
        if not self._registered.is_set():
            self._registered.set()
        if not self._added.is_set():
            self._added.set()

    def _claim(self, event: TaskRunStateEvent) -> bool:
        """Adopt the run of an add whose answer was lost, found by its tag."""
        if not self._unresolved:
            return False
        tag = (event.run.metadata or {}).get(TAG_KEY)
        pending = self._unresolved.pop(tag, None) if isinstance(tag, str) else None
        if pending is None or pending[0].done:  # (done: timed out while we looked)
            return False
        run = pending[0]
        run.run_id = event.run.run_id
        self.register(run)
        return True

    def _on_terminal(self, run: _Run, event: TaskRunStateEvent) -> None:
        status = event.run.status
        run.status = status
        if status == "completed":
            self._track(run)  # the poll workers fetch the result, which answers at once
        elif status == "failed":
            err = RunFailedError(run_id=event.run.run_id, run=event.run, error=event.run.error)
            self._pending_errors.append((run, err))
        elif status == "cancelled":
            msg = f"run {event.run.run_id} was cancelled"
            self._pending_errors.append(
                (run, RunCancelledError(msg, run_id=event.run.run_id, run=event.run))
            )

    def _poll_the_rest(self) -> None:
        """Safety net: hand every run still without an outcome to the poll workers.

        Used when the group says it is idle while we still wait (a run outside the group, an
        event we never saw) and when the stream keeps failing: ``/result`` settles each run.
        """
        for runs in self._runs.values():
            for run in runs:
                if not run.done and run.status not in _SETTLING:
                    run.status = "polling"
                    self._track(run)

    async def follow_events(self) -> None:
        """Consume the group's events until every run has an outcome.

        Errors of the stream never reach the consumer: after a few failed connections in a
        row the outstanding runs are polled instead, and the stream is tried again later.
        """
        await self._registered.wait()
        cursor: str | None = None
        idle = failures = 0
        while self._outstanding > 0 or self._producing:
            progressed = False
            try:
                stream = group_event_stream(
                    self._client,
                    self._group_id or "",
                    last_event_id=cursor,
                    api_timeout=None,
                    reconnect=False,  # come back below: when a batch is added, or soon
                )
                async with stream:
                    async for event in stream:
                        failures = 0
                        event_id = getattr(event, "event_id", None)
                        if event_id:
                            cursor = event_id
                        if isinstance(event, TaskRunStateEvent):
                            progressed = True
                            if event.run.is_terminal:
                                self._on_event(event)
                        elif isinstance(event, TaskGroupStatusEvent) and (
                            not event.status.is_active and not self._producing
                        ):
                            await self._group_went_idle()
                        await self._flush_errors()
            except ParallelError:
                failures += 1  # the stream already retried what it could
                if failures >= STREAM_FAILURES_BEFORE_POLLING:
                    self._poll_the_rest()
            await self._flush_errors()
            # The server ends the stream when the group is idle (e.g. between two batches of a
            # lazy source): come back when a batch is added, or after a growing pause.
            idle = 0 if progressed else idle + 1
            if not progressed and self._unresolved and not self._producing:
                await self._group_went_idle()  # the runs of lost adds may never send an event
            if self._outstanding > 0 or self._producing:
                # Nothing left to hear about until the next batch is added.
                pause = None if self._all_settled() else min(0.05 * 2 ** min(idle, 6), 2.0)
                with anyio.move_on_after(pause):
                    await self._added.wait()
                if self._added.is_set():
                    self._added = anyio.Event()
                    idle = 0

    def producing_done(self) -> None:
        super().producing_done()
        self._added.set()  # wake the stream follower: the group may now go idle for good

    def _all_settled(self) -> bool:
        """Every run added so far has its outcome, or is on its way to it."""
        return all(entry[0].done for entry in self._unresolved.values()) and all(
            run.done or run.status in _SETTLING for runs in self._runs.values() for run in runs
        )

    async def _group_went_idle(self) -> None:
        """A status event says the group is idle: if it still is, poll what is left.

        The first connection replays old status events too, so the group is asked first.
        """
        try:
            group = await self._client.task_group.retrieve(self._group_id or "")
        except ParallelError:
            return  # the stream and its fallback still settle every run
        if not group.status.is_active:
            self._poll_the_rest()
            await self._settle_unresolved()

    async def _settle_unresolved(self) -> None:
        """The group is idle: list it for the runs of lost adds.

        An input whose run is still not listed ends with its add's error only once the
        reconcile settle period has passed since its answer was lost (the server may still be
        creating it), or after three such periods if the group cannot even be listed.
        """
        if not self._unresolved:
            return
        listed = await self.check_membership()  # adopts listed runs through _claim
        settle = self._client.task_group.reconcile_settle
        now = time.monotonic()
        for tag, (run, cause, lost_at) in list(self._unresolved.items()):
            if now - lost_at >= (settle if listed else 3 * settle):
                del self._unresolved[tag]
                await self._emit(run, None, cause)

    async def check_membership(self) -> bool:
        """List the group's runs once: finished ones end now, runs not in the group are polled.

        A run outside the group would otherwise wait for an event that never comes. Returns
        whether the listing could be read.
        """
        members: set[str] = set()
        try:
            stream = await self._client.task_group.get_runs(self._group_id or "")
            async with stream:
                async for event in stream:
                    if isinstance(event, TaskRunStateEvent):
                        members.add(event.run.run_id)
                        if event.run.is_terminal:
                            self._on_event(event)
                        else:
                            self._claim(event)
        except ParallelError:
            return False  # the stream and its fallback still settle every run
        for run_id, runs in self._runs.items():
            if run_id not in members:
                for run in runs:
                    if not run.done and run.status not in _SETTLING:
                        run.status = "polling"
                        self._track(run)
        await self._flush_errors()
        return True

    def _on_event(self, event: TaskRunStateEvent) -> None:
        runs = self._runs.get(event.run.run_id)
        if runs is None and self._claim(event):
            runs = self._runs.get(event.run.run_id)
        if runs is None:
            if self._producing:  # may belong to a batch whose answer is on its way
                self._early[event.run.run_id] = event
            return
        for run in runs:
            if not run.done and run.status not in _SETTLING:
                self._on_terminal(run, event)

    async def _flush_errors(self) -> None:
        while self._pending_errors:
            run, err = self._pending_errors.popleft()
            await self._emit(run, None, err)

    async def sweep_deadlines(self) -> None:
        """End runs whose deadline passed as timeout outcomes (runs are in deadline order)."""
        queue = self._by_deadline
        while self._outstanding > 0 or self._producing:
            now = time.monotonic()
            while queue and (queue[0].done or queue[0].deadline <= now):
                run = queue.popleft()
                if not run.done:
                    await self._timed_out(run)
            nxt = queue[0].deadline if queue else self._deadline
            if nxt == math.inf:
                await anyio.sleep(0.5)  # no deadline yet: look again when runs arrive
            else:
                await anyio.sleep(max(0.0, nxt - time.monotonic()) + 0.001)

    async def produce_into_group(
        self, inputs: Iterable[Any] | AsyncIterable[Any], template: RunInput
    ) -> None:
        """Add the inputs to a new group in batches of up to 1,000.

        Inputs are read by this task and batched by another, so reading goes on while a batch
        is being sent, and a slow (lazy) source still gets its runs started within
        :data:`BATCH_LINGER` seconds instead of waiting for a full batch.
        """
        send, receive = anyio.create_memory_object_stream[tuple[int, Any, RunInput]](
            MAX_RUNS_PER_ADD
        )
        index = 0
        spec_size = spec_chars(template.task_spec)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._batch_adds, receive)
                async with send:
                    async for item in self._inputs(inputs):
                        self._outstanding += 1
                        run = _Run(index, None, item, self._deadline)
                        index += 1
                        if time.monotonic() >= self._deadline:
                            await self._emit(run, None, self._create_timeout())
                            continue
                        try:
                            body = _body_for(item, template, spec_size)
                        except InvalidArgumentError as exc:
                            await self._emit(run, None, exc)
                        else:
                            await send.send((run.index, item, body))
        finally:
            if self._progress.total is None:
                self._progress.total = index
            self.producing_done()
            if not self._registered.is_set():
                self._registered.set()

    def _create_timeout(self) -> RunTimeoutError:
        return RunTimeoutError(run_id="", last_status=None, timeout=self._timeout)

    async def _batch_adds(
        self, receive: MemoryObjectReceiveStream[tuple[int, Any, RunInput]]
    ) -> None:
        batch: list[tuple[int, Any, RunInput]] = []
        async with receive:
            while True:
                try:
                    item = receive.receive_nowait()
                except anyio.WouldBlock:
                    if batch:  # nothing ready: send what we have unless more comes soon
                        try:
                            with anyio.move_on_after(BATCH_LINGER) as scope:
                                item = await receive.receive()
                        except anyio.EndOfStream:
                            break  # the source ended while we lingered: send the last batch
                        if scope.cancelled_caught:
                            await self._add(batch)
                            batch = []
                            continue
                    else:
                        try:
                            item = await receive.receive()
                        except anyio.EndOfStream:
                            return
                except anyio.EndOfStream:
                    break
                batch.append(item)
                if len(batch) == MAX_RUNS_PER_ADD:
                    await self._add(batch)
                    batch = []
        if batch:
            await self._add(batch)

    async def _add(self, batch: list[tuple[int, Any, RunInput]]) -> None:
        client = self._client
        progress = self._progress
        if time.monotonic() >= self._deadline:  # the fan-out deadline also bounds creates
            for index, item, _ in batch:
                await self._emit(
                    _Run(index, None, item, self._deadline), None, self._create_timeout()
                )
            return
        # The fan-out deadline bounds the adds too (an add may reconcile for a while).
        left = None if self._deadline == math.inf else max(0.001, self._deadline - time.monotonic())
        try:
            if self._group_id is None:  # created with the first batch: map([]) makes none
                self._group_id = (await client.task_group.create(timeout=left)).taskgroup_id
            # No fan-out slot: an add may spend a while reconciling a lost answer, and its one
            # connection is budgeted beside the slots (max_in_flight + add + event stream).
            progress.in_flight += 1
            try:
                answer = await client.task_group.add_runs(
                    self._group_id or "",
                    inputs=[body for _, _, body in batch],
                    refresh_status=False,
                    betas=self._betas,
                    timeout=left,
                )
            finally:
                progress.in_flight -= 1
        except AddRunsError as exc:  # part of the batch became runs: track those
            await self._partly_added(batch, exc)
            return
        except ParallelError as exc:
            if isinstance(exc, TransportTimeoutError) and time.monotonic() >= self._deadline:
                exc = self._create_timeout()  # cut by the fan-out deadline, nothing was created
            for index, item, _ in batch:
                await self._emit(_Run(index, None, item, self._deadline), None, exc)
            return
        for (index, item, _), run_id in zip(batch, answer.run_ids, strict=True):
            self.register(_Run(index, run_id, item, self._run_deadline()))
        progress.notify()

    async def _partly_added(
        self, batch: list[tuple[int, Any, RunInput]], exc: AddRunsError
    ) -> None:
        """Track what an add that failed part-way created; unknown inputs wait for their tag."""
        cause = exc.__cause__ if isinstance(exc.__cause__, ParallelError) else exc
        unresolved = set(exc.unresolved)
        for position, ((index, item, _), run_id) in enumerate(zip(batch, exc.run_ids, strict=True)):
            if run_id is not None:
                self.register(_Run(index, run_id, item, self._run_deadline()))
            elif position in unresolved and position < len(exc.tags):
                # It may exist: wait for its tag in the group's events, not an error now.
                run = _Run(index, None, item, self._run_deadline())
                self._unresolved[exc.tags[position]] = (run, cause, time.monotonic())
                self._by_deadline.append(run)
            else:
                await self._emit(_Run(index, None, item, self._deadline), None, cause)
        if self._unresolved:
            # Their runs' events may already be here, held by run id while the add was
            # reconciling: match them by tag now (the stream cursor is past them).
            for run_id, event in list(self._early.items()):
                tag = (event.run.metadata or {}).get(TAG_KEY)
                if isinstance(tag, str) and tag in self._unresolved:
                    del self._early[run_id]
                    self._on_event(event)
            await self._flush_errors()
            # wake the stream follower (even if no run was ever registered): more to hear
            self._registered.set()
            self._added.set()


@asynccontextmanager
async def map_group(
    client: AsyncParallel,
    inputs: Iterable[Any] | AsyncIterable[Any],
    create_kwargs: dict[str, Any],
    options: FanoutOptions,
) -> AsyncIterator[Outcomes[Any]]:
    """``map`` with the group strategy (the default)."""
    template, total, output_type = map_setup(inputs, create_kwargs)
    engine = _GroupEngine(client, None, options, total=total, output_type=output_type)

    def start(tg: TaskGroup) -> None:
        tg.start_soon(engine.produce_into_group, inputs, template)
        tg.start_soon(engine.follow_events)
        tg.start_soon(engine.sweep_deadlines)
        for _ in range(client.max_in_flight):
            tg.start_soon(engine.poll_worker)

    async with serve(engine, start) as outcomes:
        yield outcomes


@asynccontextmanager
async def as_completed_group(
    client: AsyncParallel, run_ids: Iterable[str], group_id: str, options: FanoutOptions
) -> AsyncIterator[Outcomes[None]]:
    """``as_completed`` for runs of one task group, learning completions from its events."""
    ids = check_run_ids(run_ids)
    validate_id(group_id, "group")
    engine = _GroupEngine(client, group_id, options, total=len(ids))

    def start(tg: TaskGroup) -> None:
        engine._outstanding = len(ids)
        for index, run_id in enumerate(ids):
            engine.register(_Run(index, run_id, None, engine._run_deadline()))
        engine.producing_done()
        engine._registered.set()
        tg.start_soon(engine.check_membership)
        tg.start_soon(engine.follow_events)
        tg.start_soon(engine.sweep_deadlines)
        for _ in range(client.max_in_flight):
            tg.start_soon(engine.poll_worker)

    async with serve(engine, start) as outcomes:
        yield outcomes

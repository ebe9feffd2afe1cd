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
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from ._errors import (
    DisconnectedError,
    InvalidArgumentError,
    ParallelError,
    RunCancelledError,
    RunFailedError,
    TransportTimeoutError,
)
from ._events import TaskRunStateEvent
from ._fanout import (
    Outcome,
    Outcomes,
    _aiter,
    _body_for,
    _check_common,
    _Engine,
    _Run,
    serve,
)
from ._models import RunInput
from ._progress import ProgressCallback, ProgressTracker
from ._protocol import build_run_input, validate_id
from ._streams import group_event_stream
from ._task_group import MAX_RUNS_PER_ADD
from ._typed import output_type_of

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["as_completed_group", "map_group"]


class _GroupEngine(_Engine):
    """The fan-out engine fed by a group's event stream instead of rotation."""

    def __init__(self, client: AsyncParallel, group_id: str | None, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._group_id = group_id
        self._runs: dict[str, _Run] = {}
        self._early: dict[str, TaskRunStateEvent] = {}  # events that beat add_runs' answer
        self._by_deadline: deque[_Run] = deque()
        self._registered = anyio.Event()
        self._pending_errors: deque[tuple[_Run, ParallelError]] = deque()

    def register(self, run: _Run) -> None:
        """Start tracking a created run (its terminal event may already have arrived)."""
        assert run.run_id is not None  # noqa: S101 - only created runs are registered
        self._runs[run.run_id] = run
        self._by_deadline.append(run)
        self._progress.created += 1
        early = self._early.pop(run.run_id, None)
        if early is not None:
            self._on_terminal(run, early)
        if not self._registered.is_set():
            self._registered.set()

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

    async def follow_events(self) -> None:
        """Consume the group's events until every run has an outcome."""
        await self._registered.wait()
        cursor: str | None = None
        idle = 0
        while self._outstanding > 0 or self._producing:
            got_any = False
            try:
                stream = group_event_stream(
                    self._client, self._group_id or "", last_event_id=cursor, api_timeout=None
                )
                async with stream:
                    async for event in stream:
                        got_any = True
                        event_id = getattr(event, "event_id", None)
                        if event_id:
                            cursor = event_id
                        if isinstance(event, TaskRunStateEvent) and event.run.is_terminal:
                            run = self._runs.get(event.run.run_id)
                            if run is None:
                                self._early[event.run.run_id] = event
                            elif not run.done:
                                self._on_terminal(run, event)
                        await self._flush_errors()
            except (DisconnectedError, TransportTimeoutError):
                pass  # the stream already retried; start again from the cursor
            await self._flush_errors()
            # The server ends the stream when the group is idle (e.g. between two batches):
            # come back, sooner while runs keep arriving.
            idle = 0 if got_any else idle + 1
            if self._outstanding > 0 or self._producing:
                await anyio.sleep(min(0.05 * 2**idle, 1.0))

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
        """Create the group, then add the inputs to it in batches of up to 1,000."""
        client = self._client
        group = await client.task_group.create()
        self._group_id = group.taskgroup_id
        batch: list[tuple[int, Any, RunInput]] = []
        index = 0
        try:
            async for item in _aiter(inputs):
                self._outstanding += 1
                try:
                    body = _body_for(item, template)
                except InvalidArgumentError as exc:
                    await self._emit(_Run(index, None, item, self._deadline), None, exc)
                else:
                    batch.append((index, item, body))
                    if len(batch) == MAX_RUNS_PER_ADD:
                        await self._add(batch)
                        batch = []
                index += 1
            if batch:
                await self._add(batch)
        finally:
            if self._progress.total is None:
                self._progress.total = index
            self.producing_done()
            if not self._registered.is_set():
                self._registered.set()

    async def _add(self, batch: list[tuple[int, Any, RunInput]]) -> None:
        client = self._client
        progress = self._progress
        try:
            async with self._slots:
                progress.in_flight += 1
                try:
                    answer = await client.task_group.add_runs(
                        self._group_id or "",
                        inputs=[body for _, _, body in batch],
                        refresh_status=False,
                        betas=self._betas,
                    )
                finally:
                    progress.in_flight -= 1
        except ParallelError as exc:
            for index, item, _ in batch:
                await self._emit(_Run(index, None, item, self._deadline), None, exc)
            return
        for (index, item, _), run_id in zip(batch, answer.run_ids, strict=True):
            self.register(_Run(index, run_id, item, self._run_deadline()))
        progress.notify()


def _new_engine(
    client: AsyncParallel,
    group_id: str | None,
    progress: ProgressCallback | None,
    total: int | None,
    **kwargs: Any,
) -> tuple[_GroupEngine, Any, Any]:
    send, receive = anyio.create_memory_object_stream[Outcome[Any]](client.max_in_flight)
    engine = _GroupEngine(
        client, group_id, send=send, progress=ProgressTracker(progress, total), **kwargs
    )
    return engine, send, receive


@asynccontextmanager
async def map_group(
    client: AsyncParallel,
    inputs: Iterable[Any] | AsyncIterable[Any],
    create_kwargs: dict[str, Any],
    *,
    timeout: float | None,
    run_timeout: float | None,
    poll_interval: int,
    fail_fast: bool,
    progress: ProgressCallback | None,
    betas: Sequence[str] | None,
) -> AsyncIterator[Outcomes[Any]]:
    """``map`` with the group strategy (the default)."""
    template = build_run_input(input="-", **create_kwargs)
    _check_common(timeout, run_timeout, poll_interval)
    client._open()
    total = len(inputs) if isinstance(inputs, Sequence) else None
    engine, send, receive = _new_engine(
        client,
        None,
        progress,
        total,
        output_type=output_type_of(create_kwargs.get("output")),
        timeout=timeout,
        run_timeout=run_timeout,
        poll_interval=poll_interval,
        betas=betas,
    )

    def start(tg: TaskGroup) -> None:
        tg.start_soon(engine.produce_into_group, inputs, template)
        tg.start_soon(engine.follow_events)
        tg.start_soon(engine.sweep_deadlines)
        for _ in range(client.max_in_flight):
            tg.start_soon(engine.poll_worker)

    async with serve(engine, send, receive, fail_fast=fail_fast, start=start) as outcomes:
        yield outcomes


@asynccontextmanager
async def as_completed_group(
    client: AsyncParallel,
    run_ids: Iterable[str],
    group_id: str,
    *,
    timeout: float | None,
    run_timeout: float | None,
    poll_interval: int,
    fail_fast: bool,
    progress: ProgressCallback | None,
    betas: Sequence[str] | None,
) -> AsyncIterator[Outcomes[None]]:
    """``as_completed`` for runs of one task group, learning completions from its events."""
    if isinstance(run_ids, str):
        raise InvalidArgumentError("run_ids must be a list of run ids, not one string")
    ids = [validate_id(run_id) for run_id in run_ids]
    validate_id(group_id, "group")
    _check_common(timeout, run_timeout, poll_interval)
    client._open()
    engine, send, receive = _new_engine(
        client,
        group_id,
        progress,
        len(ids),
        timeout=timeout,
        run_timeout=run_timeout,
        poll_interval=poll_interval,
        betas=betas,
    )

    def start(tg: TaskGroup) -> None:
        engine._outstanding = len(ids)
        for index, run_id in enumerate(ids):
            engine.register(_Run(index, run_id, None, engine._run_deadline()))
        engine.producing_done()
        engine._registered.set()
        tg.start_soon(engine.follow_events)
        tg.start_soon(engine.sweep_deadlines)
        for _ in range(client.max_in_flight):
            tg.start_soon(engine.poll_worker)

    async with serve(engine, send, receive, fail_fast=fail_fast, start=start) as outcomes:
        yield outcomes

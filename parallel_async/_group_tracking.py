"""Group-driven tracking: learn completions from one task-group event stream.

Instead of holding a long-poll per run, ``map`` creates its runs inside a task group (in
requests of up to 1,000) and follows the group's event stream on one connection. A run that
completed is queued for its result (fetched by the same poll workers as the long-poll
strategy, at most ``max_in_flight`` at a time, answering at once); a failed or cancelled run
ends from the event itself. Connections: ``max_in_flight`` for requests plus one stream.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from ._backoff import backoff
from ._defaults import BATCH_LINGER, PROGRESS_READ_INTERVAL, STREAM_FAILURES_BEFORE_POLLING
from ._engine import FanoutOptions
from ._errors import (
    AddRunsError,
    CreateTimeoutError,
    ParallelError,
    TransportTimeoutError,
)
from ._events import TaskGroupStatus, TaskGroupStatusEvent, TaskRunStateEvent
from ._fanout import MapPlan, PollEngine, body_or_error, check_run_ids, map_setup
from ._ledger import Entry, Phase
from ._models import RunInput, TaskRun, TaskRunResult
from ._outcomes import Outcomes, serve
from ._protocol import validate_id
from ._streams import group_event_stream
from ._task_group import MAX_RUNS_PER_ADD, TAG_KEY

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["as_completed_group", "map_group"]


class GroupEngine(PollEngine):
    """The fan-out engine fed by a group's event stream instead of rotation.

    Runs wait in the ledger (``WAITING``) until the stream says they ended; only finished
    runs are fetched. Events for runs whose add is still on the wire are held (bounded: only
    while adds are pending) and matched when the add answers.
    """

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
        self.group_id = group_id
        self._early: dict[str, TaskRun] = {}  # terminal runs seen before their add answered
        self._adds_pending = 0
        self._registered = anyio.Event()  # the follower starts once there is a group to follow
        self._added = anyio.Event()  # set when a batch of runs joins the group
        self._lost: dict[Entry, tuple[ParallelError, float]] = {}  # unresolved: cause, lost at
        self._following: set[str] = set()  # run ids the client's result hub leaves to us
        # (queued, running) from the group's own status counts: the API sends no event when a
        # run starts, so a group the fan-out created tells progress what its runs are doing.
        self._group_states: tuple[int, int] | None = None
        if group_id is None:  # our own group: every run in it is ours
            ledger = self.ledger
            self.progress.states = lambda: self._group_states or (ledger.queued, ledger.running)

    def register(self, entry: Entry, run_id: str) -> None:
        """A run was created in the group for ``entry`` (its end may already have been seen)."""
        self.ledger.created(entry, run_id, "queued", self.run_deadline(), follow=True)
        self._follow(run_id)
        self.progress.created += 1
        self._wake_follower()

    def register_existing(self, index: int, run_id: str) -> None:
        """``as_completed(group=...)``: an existing run of the group."""
        self.ledger.track(index, run_id, None, self.run_deadline(), follow=True)
        self._follow(run_id)

    def _follow(self, run_id: str) -> None:
        # result() waiters of this run on the same client learn its end from our stream
        if run_id not in self._following:
            self._following.add(run_id)
            self._client._result_hub().follow((run_id,))

    async def emit(
        self, entry: Entry, result: TaskRunResult | None, error: ParallelError | None
    ) -> None:
        if entry.run_id is not None and entry.run_id in self._following:
            self._following.discard(entry.run_id)
            if result is not None:  # hub waiters of this run get it without a poll of theirs
                self._client._observe_run(result.run, source=self)
            self._client._result_hub().unfollow((entry.run_id,))
        await super().emit(entry, result, error)

    def close(self) -> None:
        if self._following:  # still-running runs: the hub polls them for its own waiters
            self._client._result_hub().unfollow(self._following)
            self._following = set()
        super().close()

    def _wake_follower(self) -> None:
        self._registered.set()
        self._added.set()

    async def _on_run(self, run: TaskRun) -> None:
        """A run's status from the stream or a listing."""
        ledger = self.ledger
        if not ledger.entries(run.run_id):
            tag = (run.metadata or {}).get(TAG_KEY)
            if isinstance(tag, str) and ledger.adopt(tag, run.run_id) is not None:
                self._lost = {e: v for e, v in self._lost.items() if e.phase is Phase.UNRESOLVED}
            elif run.is_terminal and self._adds_pending:
                self._early[run.run_id] = run  # its add's answer may be on its way
                return
        queued = ledger.queued
        if run.is_terminal and run.status != "completed":
            self._client._observe_run(run, source=self)  # hub waiters end without a request
        await self.act(ledger.observed(run))
        if ledger.queued != queued:  # a run started: progress shows it, not only endings
            self.progress.notify()

    def _poll_the_rest(self) -> None:
        """Safety net: every run still waiting for the stream is polled instead.

        Used when the group says it is idle while we still wait (a run outside the group, an
        event we never saw) and when the stream keeps failing: ``/result`` settles each run.
        """
        self.ledger.not_followed(self.ledger.waiting())
        self.wake_workers()

    async def follow_events(self) -> None:
        """Consume the group's events until every run has an outcome.

        Errors of the stream never reach the consumer: after a few failed connections in a
        row the outstanding runs are polled instead, and the stream is tried again later.
        """
        await self._registered.wait()
        cursor: str | None = None
        idle = failures = 0
        while self.outstanding > 0 or self.producing:
            progressed = False
            try:
                stream = group_event_stream(
                    self._client,
                    self.group_id or "",
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
                            await self._on_run(event.run)
                        elif isinstance(event, TaskGroupStatusEvent):
                            self._status_counts(event.status)
                            if not event.status.is_active and not self.producing:
                                await self._group_went_idle()
            except ParallelError:
                failures += 1  # the stream already retried what it could
                if failures >= STREAM_FAILURES_BEFORE_POLLING:
                    self._poll_the_rest()
            # The server ends the stream when the group is idle (e.g. between two batches of a
            # lazy source): come back when a batch is added, or after a growing pause.
            idle = 0 if progressed else idle + 1
            if not progressed and self._lost and not self.producing:
                await self._group_went_idle()  # the runs of lost adds may never send an event
            if self.outstanding > 0 or self.producing:
                # Nothing left to hear about until the next batch is added.
                pause = None if self.ledger.settled else backoff(idle, first=0.05, cap=2.0)
                with anyio.move_on_after(pause):
                    await self._added.wait()
                if self._added.is_set():
                    self._added = anyio.Event()
                    idle = 0

    def _status_counts(self, status: TaskGroupStatus) -> None:
        counts = status.task_run_status_counts
        queued = counts.get("queued", 0)
        running = sum(counts.get(s, 0) for s in ("running", "cancelling", "action_required"))
        if (queued, running) != self._group_states:
            self._group_states = (queued, running)
            self.progress.notify()

    async def watch_progress(self) -> None:
        """While a progress callback is set, read the group's status counts now and then."""
        if self.progress.callback is None:
            return
        await self._registered.wait()
        while self.outstanding > 0 or self.producing:
            # a failed read only makes progress late: outcomes never depend on it
            with contextlib.suppress(ParallelError):
                if self.group_id is not None:
                    group = await self._client.task_group.retrieve(self.group_id)
                    self._status_counts(group.status)
            await anyio.sleep(PROGRESS_READ_INTERVAL)

    def producing_done(self) -> None:
        super().producing_done()
        self._wake_follower()  # the group may now go idle for good

    async def _group_went_idle(self) -> None:
        """A status event says the group is idle: if it still is, poll what is left.

        The first connection replays old status events too, so the group is asked first.
        """
        try:
            group = await self._client.task_group.retrieve(self.group_id or "")
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
        if not self._lost:
            return
        listed = await self.check_membership()  # adopts listed runs
        settle = self._client.task_group.reconcile_settle
        now = time.monotonic()
        for entry, (cause, lost_at) in list(self._lost.items()):
            if entry.phase is not Phase.UNRESOLVED:
                del self._lost[entry]
            elif now - lost_at >= (settle if listed else 3 * settle):
                del self._lost[entry]
                await self.act(self.ledger.give_up(entry, cause))

    async def check_membership(self) -> bool:
        """List the group's runs once: finished ones end now, runs not in the group are polled.

        A run outside the group would otherwise wait for an event that never comes. Returns
        whether the listing could be read.
        """
        members: set[str] = set()
        try:
            stream = await self._client.task_group.get_runs(self.group_id or "")
            async with stream:
                async for event in stream:
                    if isinstance(event, TaskRunStateEvent):
                        members.add(event.run.run_id)
                        await self._on_run(event.run)
        except ParallelError:
            return False  # the stream and its fallback still settle every run
        self.ledger.not_followed(e for e in self.ledger.waiting() if e.run_id not in members)
        self.wake_workers()
        return True

    async def produce_into_group(
        self, inputs: Iterable[Any] | AsyncIterable[Any], plan: MapPlan
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
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._batch_adds, receive)
                async with send:
                    async for item in self.inputs(inputs):
                        self.outstanding += 1
                        index += 1
                        if self.deadline.passed():
                            await self.fail_input(index - 1, item, self._create_timeout())
                            continue
                        body, bad = body_or_error(plan, item)
                        if bad is not None:
                            await self.fail_input(index - 1, item, bad)
                        else:
                            await send.send((index - 1, item, body))
        finally:
            if self.progress.total is None:
                self.progress.total = index
            self.producing_done()

    def _create_timeout(self) -> CreateTimeoutError:
        return CreateTimeoutError(timeout=self.deadline.timeout)

    async def _batch_adds(
        self, receive: MemoryObjectReceiveStream[tuple[int, Any, RunInput]]
    ) -> None:
        batch: list[tuple[int, Any, RunInput]] = []
        async with receive:
            while True:
                item: tuple[int, Any, RunInput] | None
                try:
                    item = receive.receive_nowait()
                except anyio.WouldBlock:
                    item = None  # awaited below, outside the except block
                except anyio.EndOfStream:
                    break
                if item is None:
                    try:
                        # nothing ready: send what we have unless more comes soon
                        with anyio.move_on_after(BATCH_LINGER if batch else None):
                            item = await receive.receive()
                    except anyio.EndOfStream:
                        break  # the source ended (while we lingered: send the last batch)
                    if item is None:  # lingered long enough: send the partial batch
                        await self._add(batch)
                        batch = []
                        continue
                batch.append(item)
                if len(batch) == MAX_RUNS_PER_ADD:
                    await self._add(batch)
                    batch = []
        if batch:
            await self._add(batch)

    async def _add(self, batch: list[tuple[int, Any, RunInput]]) -> None:
        client = self._client
        progress = self.progress
        ledger = self.ledger
        if self.deadline.passed():  # the fan-out deadline also bounds creates
            for index, item, _ in batch:
                await self.fail_input(index, item, self._create_timeout())
            return
        entries = [ledger.creating(index, item) for index, item, _ in batch]
        # The fan-out deadline bounds the adds too (an add may reconcile for a while).
        left = None if self.deadline.is_never else max(0.001, self.deadline.remaining())
        self._adds_pending += 1
        try:
            if self.group_id is None:  # created with the first batch: map([]) makes none
                self.group_id = (await client.task_group.create(timeout=left)).taskgroup_id
                self.channel.group_id = self.group_id
            # No fan-out slot: an add may spend a while reconciling a lost answer, and its one
            # connection is budgeted beside the slots (max_in_flight + add + event stream).
            progress.in_flight += 1
            try:
                answer = await client.task_group.add_runs(
                    self.group_id or "",
                    inputs=[body for _, _, body in batch],
                    refresh_status=False,
                    betas=self._betas,
                    timeout=left,
                )
            finally:
                progress.in_flight -= 1
        except ParallelError as exc:
            failure: ParallelError | None = exc
        else:
            failure = None
        finally:
            self._adds_pending -= 1
        # Reported outside the except block: no error as a later cancellation's context.
        if isinstance(failure, AddRunsError):  # part of the batch became runs: track those
            await self._partly_added(entries, failure)
            return
        if failure is not None:
            if isinstance(failure, TransportTimeoutError) and self.deadline.passed():
                failure = self._create_timeout()  # cut by the fan-out deadline: nothing created
            for entry in entries:
                await self.act(ledger.create_failed(entry, failure))
            return
        for entry, run_id in zip(entries, answer.run_ids, strict=True):
            self.register(entry, run_id)
        await self._match_early()
        progress.notify()

    async def _match_early(self) -> None:
        """Terminal events that beat their add's answer: match them now, by run id or by the
        tag of an unresolved input (the stream cursor is past them). Once no add is pending,
        the rest belong to no run of ours and are dropped."""
        if not self._early:
            return
        for run_id, run in list(self._early.items()):
            tag = (run.metadata or {}).get(TAG_KEY)
            ours = self.ledger.entries(run_id) or (
                isinstance(tag, str) and tag in {e.tag for e in self._lost}
            )
            if ours:
                del self._early[run_id]
                await self._on_run(run)
        if not self._adds_pending:
            self._early.clear()

    async def _partly_added(self, entries: list[Entry], exc: AddRunsError) -> None:
        """Track what an add that failed part-way created; unknown inputs wait for their tag."""
        cause = exc.__cause__ if isinstance(exc.__cause__, ParallelError) else exc
        unresolved = set(exc.unresolved)
        now = time.monotonic()
        for position, (entry, run_id) in enumerate(zip(entries, exc.run_ids, strict=True)):
            if run_id is not None:
                self.register(entry, run_id)
            elif position in unresolved and position < len(exc.tags):
                # It may exist: wait for its tag in the group's events, not an error now.
                self.ledger.add_lost(entry, exc.tags[position], self.run_deadline())
                self._lost[entry] = (cause, now)
            else:
                await self.act(self.ledger.create_failed(entry, cause))
        await self._match_early()
        if self._lost:
            self._wake_follower()  # even if no run was ever registered: more to hear


@asynccontextmanager
async def map_group(
    client: AsyncParallel,
    inputs: Iterable[Any] | AsyncIterable[Any],
    create_kwargs: dict[str, Any],
    options: FanoutOptions,
) -> AsyncIterator[Outcomes[Any]]:
    """``map`` with the group strategy (the default)."""
    plan = map_setup(inputs, create_kwargs)
    engine = GroupEngine(client, None, options, total=plan.total, output_type=plan.output_type)

    def start(tg: TaskGroup) -> None:
        tg.start_soon(engine.end_on_close)
        tg.start_soon(engine.produce_into_group, inputs, plan)
        tg.start_soon(engine.follow_events)
        tg.start_soon(engine.watch_progress)
        tg.start_soon(engine.sweep_deadlines)
        for _ in range(client.max_in_flight):
            tg.start_soon(engine.poll_worker)

    async with serve(engine.channel, start, engine.close) as outcomes:
        yield outcomes


@asynccontextmanager
async def as_completed_group(
    client: AsyncParallel, run_ids: Iterable[str], group_id: str, options: FanoutOptions
) -> AsyncIterator[Outcomes[None]]:
    """``as_completed`` for runs of one task group, learning completions from its events."""
    ids = check_run_ids(run_ids)
    validate_id(group_id, "group")
    engine = GroupEngine(client, group_id, options, total=len(ids))
    engine.channel.group_id = group_id

    def start(tg: TaskGroup) -> None:
        tg.start_soon(engine.end_on_close)
        engine.outstanding = len(ids)
        engine.progress.created = len(ids)
        for index, run_id in enumerate(ids):
            engine.register_existing(index, run_id)
        engine.producing_done()
        tg.start_soon(engine.check_membership)
        tg.start_soon(engine.follow_events)
        tg.start_soon(engine.sweep_deadlines)
        for _ in range(client.max_in_flight):
            tg.start_soon(engine.poll_worker)

    async with serve(engine.channel, start, engine.close) as outcomes:
        yield outcomes

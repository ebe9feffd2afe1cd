"""A job's run side: its task group, adds of rows (intents first), reconciling, results.

Exactly one run per row key, even across crashes: the intents of a batch are committed
(durably) before its add is sent; on start, every intent left by an earlier process is
reconciled against the group's runs (by metadata) until found, or until a read started
``settle`` seconds after the intent was written finds it still missing; only then is it sent
again. An add whose answer is lost in this process is reconciled by ``add_runs`` itself;
inputs it leaves unresolved are reconciled the same way.

Completions come from the group's event stream (one connection, resumed by cursor), matched
to rows by metadata, so a run whose add answer was lost is adopted too; completed runs'
results are fetched by ``client.task_run.result``. The row side (reading, the window,
progress) is ``_enrich_job``'s; the rows' states, the `RowBook`'s.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from ._enrich_book import Row, RowBook
from ._errors import (
    AddRunsError,
    AuthenticationError,
    NotFoundError,
    ParallelError,
    PaymentRequiredError,
    PermissionDeniedError,
)
from ._events import TaskRunStateEvent
from ._fields import ATTEMPT_METADATA, ROW_KEY_METADATA
from ._journal import Journal
from ._models import RunInput, TaskRun, TaskRunJsonOutput
from ._task_group import MAX_RUNS_PER_ADD

if TYPE_CHECKING:
    from ._client import AsyncParallel
    from ._enrich_job import JobSettings

__all__ = ["BATCH_LINGER", "JobRuns", "run_identity"]

log = logging.getLogger("parallel_async")

BATCH_LINGER = 0.2  # seconds a partial batch waits for more rows before it is sent
_PAUSE_MAX = 5.0
_STOPPING = (AuthenticationError, PermissionDeniedError, PaymentRequiredError, NotFoundError)

_ENCODER = msgspec.json.Encoder()


class JobRuns:
    """The runs of one job invocation: ``send_tx`` takes rows to send; `sender`, `follow`
    and `fetcher` are the job's tasks; the book learns every run and outcome."""

    def __init__(
        self,
        client: AsyncParallel,
        journal: Journal,
        settings: JobSettings,
        book: RowBook,
        *,
        identify: Callable[[Any], tuple[str, Any]],
        report: Callable[[], None],
    ) -> None:
        self._client = client
        self._journal = journal
        self.settings = settings
        self._fp = settings.fingerprint
        self.book = book
        self._identify = identify
        self._report = report
        self.group_id: str | None = None
        self._group_ready = anyio.Event()
        self._group_lock = anyio.Lock()
        self._added = anyio.Event()  # a batch joined the group: wake the follower
        self.send_tx, self._send_rx = anyio.create_memory_object_stream[Row](math.inf)
        self._fetch_tx, self._fetch_rx = anyio.create_memory_object_stream[Row](math.inf)
        self.created = 0

    def use_group(self, group_id: str) -> None:
        """The job's task group, as journaled by an earlier invocation."""
        self.group_id = group_id
        self._group_ready.set()

    def close(self) -> None:
        """Close the streams of rows to send and to fetch."""
        for stream in (self.send_tx, self._send_rx, self._fetch_tx, self._fetch_rx):
            stream.close()

    # --- resuming -------------------------------------------------------------------------------

    async def resume(self) -> None:
        """Load the rows an earlier process left unsettled; reconcile its intents first."""
        unsettled = await self._journal.unsettled(self._fp)
        intents: list[tuple[Row, float]] = []
        for rec in unsettled:
            if rec.status == "running" and rec.run_id is not None:
                row = Row(rec.key, rec.attempt, "running", rec.run_id)
            else:
                row = Row(rec.key, rec.attempt, "intent")
                intents.append((row, rec.intent_at or 0.0))
            self.book.rows[rec.key] = row
        if not intents:
            return
        missing = await self._reconcile(intents)
        for row in missing:
            row.state = "orphan"  # never created: sent again if its row is read this time
        log.info(
            "resumed: %d runs in flight, %d intents found, %d never created",
            len(unsettled) - len(intents),
            len(intents) - len(missing),
            len(missing),
        )

    async def _reconcile(self, rows: list[tuple[Row, float]]) -> list[Row]:
        """Find the runs of intents (row, when its create was sent) in the group; return the
        rows never created.

        A row is given up on once a read that started ``settle`` seconds after its intent
        (wall clock, as journaled) did not find it; until then the group is read again.
        """
        if self.group_id is None:
            return [row for row, _ in rows]  # the group is journaled before any intent
        settle = self.settings.settle
        missing: list[Row] = []
        waiting = {(r.key, r.attempt): (r, at + settle) for r, at in rows if r.state == "intent"}
        pause = 0.25
        while waiting:
            started = time.time()
            async for run in self._group_runs():
                entry = waiting.pop(run_identity(run), None)
                if entry is not None and entry[0].state == "intent":
                    self._adopt(entry[0], run.run_id)
            for ident, (row, until) in list(waiting.items()):
                if row.state != "intent":  # adopted meanwhile, from its event
                    del waiting[ident]
                elif started >= until:
                    missing.append(row)
                    del waiting[ident]
            if waiting:
                soonest = min(until for _, until in waiting.values())
                await anyio.sleep(max(0.0, min(pause, soonest - time.time())))
                pause = min(pause * 2, _PAUSE_MAX)
        return missing

    async def _group_runs(self) -> AsyncIterator[TaskRun]:
        assert self.group_id is not None  # noqa: S101
        stream = await self._client.task_group.get_runs(self.group_id)
        async with stream:
            async for event in stream:
                if isinstance(event, TaskRunStateEvent):
                    yield event.run

    def _adopt(self, row: Row, run_id: str) -> None:
        row.run_id = run_id
        if row.state == "intent":
            self.book.move(row, "running")
        self._journal.record_runs(self._fp, [(row.key, run_id)])

    # --- sending --------------------------------------------------------------------------------

    async def sender(self) -> None:
        async with self._send_rx:
            ended = False
            while not ended:
                try:
                    batch = [await self._send_rx.receive()]
                except anyio.EndOfStream:
                    return
                with anyio.move_on_after(BATCH_LINGER):
                    while len(batch) < MAX_RUNS_PER_ADD:
                        try:
                            batch.append(await self._send_rx.receive())
                        except anyio.EndOfStream:
                            ended = True
                            break
                await self._send(batch)

    async def _ensure_group(self) -> str:
        async with self._group_lock:
            if self.group_id is None:
                group = await self._client.task_group.create(metadata={"pa_job": self._fp})
                await self._journal.set_group(self._fp, group.taskgroup_id)  # before any intent
                self.group_id = group.taskgroup_id
                self._group_ready.set()
            return self.group_id

    async def _send(self, batch: list[Row]) -> None:
        group = await self._ensure_group()
        await self._journal.write_intents(  # committed before the add goes out
            self._fp, [(r.key, r.attempt) for r in batch], time.time()
        )
        inputs = [
            RunInput(
                input=r.input,
                processor=self.settings.processor,
                metadata={ROW_KEY_METADATA: r.key, ATTEMPT_METADATA: r.attempt},
            )
            for r in batch
        ]
        for r in batch:
            self.book.move(r, "intent")
            r.input = None
        try:
            answer = await self._client.task_group.add_runs(
                group, inputs=inputs, default_task_spec=self.settings.spec.task_spec
            )
            run_ids: Sequence[str | None] = answer.run_ids
            unresolved: list[Row] = []
        except AddRunsError as exc:
            run_ids = exc.run_ids
            unresolved = [batch[i] for i in exc.unresolved]
            lost = set(exc.unresolved)
            if any(rid is None and i not in lost for i, rid in enumerate(run_ids)):
                raise  # some inputs were refused for good: the cause says why
        created = [(r, rid) for r, rid in zip(batch, run_ids, strict=True) if rid is not None]
        self.created += len(created)
        self._journal.record_runs(self._fp, [(r.key, rid) for r, rid in created])
        for r, rid in created:
            if r.run_id is None:
                r.run_id = rid
            if r.state == "intent":
                self.book.move(r, "running")
        if created:
            self._added.set()
        if unresolved:
            log.warning("%d runs of an add could not be confirmed; reconciling", len(unresolved))
            for row in await self._reconcile([(row, time.time()) for row in unresolved]):
                await self._send_again(row)
        self._report()

    async def _send_again(self, row: Row) -> None:
        """An intent confirmed as never created: send it again (its input is rebuilt)."""
        record = self.book.first_record(row.key)
        if record is None:
            return
        _, row.input = self._identify(record)
        self.book.move(row, "send")
        await self._send([row])

    # --- following the group and fetching results -----------------------------------------------

    async def follow(self) -> None:
        await self._group_ready.wait()
        assert self.group_id is not None  # noqa: S101
        cursor: str | None = None
        pause = 0.1
        while True:
            try:
                stream = await self._client.task_group.events(self.group_id, last_event_id=cursor)
                async with stream:
                    async for event in stream:
                        if isinstance(event, TaskRunStateEvent):
                            pause = 0.1
                            if event.run.is_terminal:
                                self._on_terminal(event.run)
                        event_id = getattr(event, "event_id", None)
                        if event_id:
                            cursor = event_id
            except _STOPPING:
                raise
            except ParallelError as exc:
                log.warning("the events of %s failed (%s); reconnecting", self.group_id, exc)
            # The stream ends when the group is idle: come back when runs are added (or soon,
            # in case the close was not the group's end).
            with anyio.move_on_after(pause):
                await self._added.wait()
            if self._added.is_set():
                self._added = anyio.Event()
            pause = min(pause * 2, _PAUSE_MAX)

    def _on_terminal(self, run: TaskRun) -> None:
        key, attempt = run_identity(run)
        row = self.book.rows.get(key)
        if row is None or row.attempt != attempt or row.state not in ("intent", "running"):
            return  # another job's, an earlier attempt's, or settled already
        if row.run_id is None:
            self._adopt(row, run.run_id)  # its add's answer was lost
        elif row.run_id != run.run_id:
            log.warning("row %s has a second run %s; keeping %s", row.key, run.run_id, row.run_id)
            return
        if run.status == "completed":
            self.book.move(row, "fetch")
            self._fetch_tx.send_nowait(row)
        else:
            reason = run.error.message if run.error is not None and run.error.message else None
            self.book.settle(row, "failed", error=reason or f"the run was {run.status}")
            self._report()

    async def fetcher(self) -> None:
        while True:
            ready: Row | None
            try:  # a ready row without a trip round the event loop (the request yields anyway)
                ready = self._fetch_rx.receive_nowait()
            except anyio.WouldBlock:
                ready = None  # awaited below, outside the except block
            except anyio.EndOfStream:
                return
            if ready is None:
                try:
                    ready = await self._fetch_rx.receive()
                except anyio.EndOfStream:
                    return
            row = ready
            assert row.run_id is not None  # noqa: S101
            try:
                result = await self._client.task_run.result(row.run_id, timeout=600)
            except _STOPPING:
                raise
            except ParallelError as exc:
                log.warning("could not fetch the result of %s: %s", row.run_id, exc)
                self.book.settle(row, "running", error=f"its result could not be fetched: {exc}")
                continue
            output = result.output
            basis = _ENCODER.encode(output.basis).decode() if output.basis else None
            if isinstance(output, TaskRunJsonOutput):
                self.book.settle(row, "completed", output=output.content, basis=basis)
            else:
                self.book.settle(
                    row, "completed", output={}, basis=basis, error="the run answered text"
                )
            self._report()


def run_identity(run: TaskRun) -> tuple[str, int]:
    """(row key, attempt) from a run's metadata; ("", 0) for a run of no row."""
    meta = run.metadata or {}
    key, attempt = meta.get(ROW_KEY_METADATA), meta.get(ATTEMPT_METADATA)
    if not isinstance(key, str) or not isinstance(attempt, int) or isinstance(attempt, bool):
        return "", 0
    return key, attempt

"""The enrichment engine's I/O: read, send, follow, fetch; one run per row key.

A job reads its records, names each by `row_key`, and asks the journal what it knows; the
`RowBook` decides: answered rows are delivered at once, rows with a run are awaited, the rest
are sent in adds of up to 1,000 to the job's task group, each run carrying its row key and
attempt in its metadata.

Exactly one run per row key, even across crashes: the intents of a batch are committed
(durably) before its add is sent; on start, every intent left by an earlier process is
reconciled against the group's runs (by metadata) until found, or until a read started
``settle`` seconds after the intent was written finds it still missing; only then is it sent
again. An add whose answer is lost in this process is reconciled by ``add_runs`` itself;
inputs it leaves unresolved are reconciled the same way.

Completions come from the group's event stream (one connection, resumed by cursor), matched
to rows by metadata, so a run whose add answer was lost is adopted too; completed runs'
results are fetched by ``client.task_run.result``. Outcomes are journaled in batches.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from ._enrich_book import BadRecord, Delivery, Row, RowBook
from ._errors import (
    AddRunsError,
    AuthenticationError,
    InvalidArgumentError,
    NotFoundError,
    ParallelError,
    PaymentRequiredError,
    PermissionDeniedError,
)
from ._events import TaskRunStateEvent
from ._fields import ATTEMPT_METADATA, RESERVED_COLUMNS, ROW_KEY_METADATA, OutputSpec, row_key
from ._journal import Journal
from ._models import RunInput, TaskRun, TaskRunJsonOutput
from ._protocol import check_spec_and_input, spec_chars
from ._task_group import MAX_RUNS_PER_ADD

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["BadRecord", "Delivery", "Job", "JobSettings"]

log = logging.getLogger("parallel_async")

BATCH_LINGER = 0.2  # seconds a partial batch waits for more rows before it is sent
_READ_CHUNK = 500  # rows looked up in the journal at once
_OUTCOME_FLUSH = 0.25  # seconds between journal writes of outcomes
_PROGRESS_EVERY = 0.1  # seconds between progress callbacks
_PAUSE_MAX = 5.0
_FETCHERS_MAX = 256
_STOPPING = (AuthenticationError, PermissionDeniedError, PaymentRequiredError, NotFoundError)

_ENCODER = msgspec.json.Encoder()


class JobSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What a job asks and how (checked by the caller)."""

    spec: OutputSpec
    processor: str
    fingerprint: str
    columns: tuple[str, ...] | None
    key: str | None
    order: str  # "input" | "completed"
    timeout: float | None
    retry_failed: bool
    window: int
    settle: float


class Job:
    """One invocation of an enrichment job. Call `run`; deliveries come out of ``out``."""

    def __init__(
        self,
        client: AsyncParallel,
        journal: Journal,
        records: Iterable[Any] | AsyncIterable[Any],
        settings: JobSettings,
        *,
        total: int | None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._client = client
        self._journal = journal
        self._records = records
        self.settings = settings
        self._spec_size = spec_chars(settings.spec.task_spec)
        self._fp = settings.fingerprint
        self.book = RowBook(settings.order, self._check_finished)
        self.out = self.book.out
        self._held = 0  # read and not yet taken by the consumer
        self._room = anyio.Event()
        self._read = 0
        self.total = total
        self._reader_done = False
        self._finished = anyio.Event()
        self._expired = False
        self.group_id: str | None = None
        self._group_ready = anyio.Event()
        self._group_lock = anyio.Lock()
        self._added = anyio.Event()  # a batch joined the group: wake the follower
        self._send_tx, self._send_rx = anyio.create_memory_object_stream[Row](math.inf)
        self._fetch_tx, self._fetch_rx = anyio.create_memory_object_stream[Row](math.inf)
        self.created = 0
        self.started = time.monotonic()
        self._on_progress = on_progress
        self._progress_at = 0.0

    @property
    def elapsed(self) -> float:
        """Seconds since the job started."""
        return time.monotonic() - self.started

    @property
    def delivered(self) -> dict[str, int]:
        """Input rows handed out, by status (and ``reused``: answered from the journal)."""
        return self.book.delivered

    def taken(self) -> None:
        """The consumer took one delivery: room for one more row."""
        self._held -= 1
        if self._held < self.settings.window:
            self._room.set()

    # --- the whole job --------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the job to its end (or its deadline)."""
        try:
            job = await self._journal.job(
                self._fp,
                processor=self.settings.processor,
                schema=self.settings.spec.schema,
                columns=self.settings.columns,
                key_column=self.settings.key,
            )
            assert job is not None  # noqa: S101 - created when missing
            if job.group_id is not None:
                self.group_id = job.group_id
                self._group_ready.set()
            await self._resume()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_all)
                await self._work()  # returns once every row read was delivered
        finally:
            self._flush_outcomes()
            self._report(force=True)
            for stream in (self._send_tx, self._send_rx, self._fetch_tx, self._fetch_rx):
                stream.close()
            self.book.close()

    async def _work(self) -> None:
        """Send, follow and fetch until every row is delivered or the deadline passes."""
        timeout = self.settings.timeout
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        with anyio.CancelScope(deadline=deadline) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sender)
                tg.start_soon(self._follow)
                tg.start_soon(self._flusher)
                for _ in range(max(1, min(self._client.max_in_flight, _FETCHERS_MAX))):
                    tg.start_soon(self._fetcher)
                await self._finished.wait()
                tg.cancel_scope.cancel()
        if scope.cancelled_caught and not self._finished.is_set():
            self._expired = True
            self.book.expire()
            await self._finished.wait()  # the reader delivers the rest as it stands

    def _check_finished(self) -> None:
        if self._reader_done and self.book.idle and not self._finished.is_set():
            self._finished.set()

    # --- resuming -------------------------------------------------------------------------------

    async def _resume(self) -> None:
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
                entry = waiting.pop(_run_identity(run), None)
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

    # --- reading --------------------------------------------------------------------------------

    async def _read_all(self) -> None:
        size = min(_READ_CHUNK, self.settings.window)
        if isinstance(self._records, AsyncIterable):
            await self._read_async(self._records, size)
        else:
            chunk: list[Any] = []
            await self._wait_for_room()
            for record in self._records:
                chunk.append(record)
                if len(chunk) >= size:
                    await self._admit(chunk)
                    chunk = []
                    await self._wait_for_room()  # before reading on: memory stays bounded
            if chunk:
                await self._admit(chunk)
        self.total = self._read
        self._reader_done = True
        self._send_tx.close()
        self._check_finished()

    async def _read_async(self, records: AsyncIterable[Any], size: int) -> None:
        """Admit what a lazy source has given so far, without waiting to fill a chunk."""
        tx, rx = anyio.create_memory_object_stream[Any](size)

        async def pump() -> None:
            async with tx:
                async for record in records:
                    await tx.send(record)

        async with rx, anyio.create_task_group() as tg:
            tg.start_soon(pump)
            async for first in rx:
                chunk = [first]
                while len(chunk) < size:
                    try:
                        chunk.append(rx.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await self._admit(chunk)

    async def _wait_for_room(self) -> None:
        while self._held >= self.settings.window:
            self._room = anyio.Event()
            await self._room.wait()

    async def _admit(self, chunk: list[Any]) -> None:
        await self._wait_for_room()
        slots: list[tuple[int, Any, str | None, Any]] = []  # position, record, key, input|error
        for record in chunk:
            position = self._read
            self._read += 1
            self._held += 1
            if isinstance(record, BadRecord):
                slots.append((position, record, None, record.error))
                continue
            if position == 0 and isinstance(record, Mapping):
                _check_clashes(record, self.settings.spec)  # stops the job: before any request
            try:
                key, run_input = self._identify(record)
            except InvalidArgumentError as exc:
                slots.append((position, record, None, str(exc)))
                continue
            slots.append((position, record, key, run_input))
        rows = self.book.rows
        lookup = sorted({s[2] for s in slots if s[2] is not None and s[2] not in rows})
        self._flush_outcomes()  # queued before the lookup, so the lookup sees them
        known = await self._journal.lookup(self._fp, lookup) if lookup else {}
        for position, record, name, extra in slots:
            if name is None:
                self.book.fail(position, record, str(extra))
            elif self._expired:
                self.book.after_deadline(position, record, name, known.get(name))
            else:
                rec = known.get(name)
                row = self.book.place(
                    position, record, name, extra, rec, retry_failed=self.settings.retry_failed
                )
                if row is not None:
                    self._send_tx.send_nowait(row)
        self._report()

    def _identify(self, record: Any) -> tuple[str, Any]:
        if not isinstance(record, Mapping):
            raise InvalidArgumentError(
                f"a record must be a dict of column values, not {type(record).__name__}"
            )
        columns = self.settings.columns
        key = row_key(record, fingerprint=self._fp, key=self.settings.key, columns=columns)
        run_input = dict(record) if columns is None else {c: record.get(c) for c in columns}
        check_spec_and_input(self._spec_size, run_input)
        return key, run_input

    # --- sending --------------------------------------------------------------------------------

    async def _sender(self) -> None:
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

    async def _follow(self) -> None:
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
        key, attempt = _run_identity(run)
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

    async def _fetcher(self) -> None:
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

    # --- journal and progress -------------------------------------------------------------------

    def _flush_outcomes(self) -> None:
        outcomes = self.book.outcomes
        if outcomes:
            self.book.outcomes = []
            self._journal.record_outcomes(self._fp, outcomes)

    async def _flusher(self) -> None:
        while True:
            await anyio.sleep(_OUTCOME_FLUSH)
            self._flush_outcomes()
            self._report()

    def _report(self, *, force: bool = False) -> None:
        if self._on_progress is None:
            return
        now = time.monotonic()
        if not force and now - self._progress_at < _PROGRESS_EVERY:
            return
        self._progress_at = now
        delivered = self.book.delivered
        self._on_progress(
            {
                "total": self.total,
                "read": self._read,
                "queued": self.book.counts["queued"],
                "running": self.book.counts["running"],
                "completed": delivered["completed"],
                "failed": delivered["failed"],
                "reused": delivered["reused"],
                "created": self.created,
                "elapsed": now - self.started,
            }
        )


def _check_clashes(record: Mapping[str, Any], spec: OutputSpec) -> None:
    clash = [n for n in (*spec.names, *RESERVED_COLUMNS) if n in record]
    if clash:
        raise InvalidArgumentError(
            f"the input already has column(s) {', '.join(map(repr, clash))}: rename the output "
            "field(s) or the input column(s); input columns are never overwritten"
        )


def _run_identity(run: TaskRun) -> tuple[str, int]:
    """(row key, attempt) from a run's metadata; ("", 0) for a run of no row."""
    meta = run.metadata or {}
    key, attempt = meta.get(ROW_KEY_METADATA), meta.get(ATTEMPT_METADATA)
    if not isinstance(key, str) or not isinstance(attempt, int) or isinstance(attempt, bool):
        return "", 0
    return key, attempt

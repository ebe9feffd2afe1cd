"""The enrichment engine's I/O: read, send, follow, fetch; one run per row key.

A job reads its records, names each by `row_key`, and asks the journal what it knows; the
`RowBook` decides: answered rows are delivered at once, rows with a run are awaited, the rest
are sent in adds of up to 1,000 to the job's task group, each run carrying its row key and
attempt in its metadata. Outcomes are journaled in batches.

This module is the row side: reading within the window, naming and checking rows, the
job's tasks and deadline, progress. The run side (the group, intents before adds,
reconciling, following the group's events, fetching results) is ``_enrich_runs``'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from ._enrich_book import BadRecord, Delivery, RowBook
from ._enrich_runs import JobRuns
from ._errors import InvalidArgumentError
from ._fields import RESERVED_COLUMNS, OutputSpec, row_key
from ._journal import Journal
from ._protocol import check_spec_and_input, spec_chars

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["BadRecord", "Delivery", "Job", "JobSettings"]

_READ_CHUNK = 500  # rows looked up in the journal at once
_OUTCOME_FLUSH = 0.25  # seconds between journal writes of outcomes
_PROGRESS_EVERY = 0.1  # seconds between progress callbacks
_FETCHERS_MAX = 256


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
        self.runs = JobRuns(
            client, journal, settings, self.book, identify=self._identify, report=self._report
        )
        self.started = time.monotonic()
        self._on_progress = on_progress
        self._progress_at = 0.0

    @property
    def elapsed(self) -> float:
        """Seconds since the job started."""
        return time.monotonic() - self.started

    @property
    def created(self) -> int:
        """Runs created by this invocation."""
        return self.runs.created

    @property
    def group_id(self) -> str | None:
        """The task group holding the job's runs (``None`` until known)."""
        return self.runs.group_id

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
                self.runs.use_group(job.group_id)
            await self.runs.resume()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_all)
                await self._work()  # returns once every row read was delivered
        finally:
            self._flush_outcomes()
            self._report(force=True)
            self.runs.close()
            self.book.close()

    async def _work(self) -> None:
        """Send, follow and fetch until every row is delivered or the deadline passes."""
        timeout = self.settings.timeout
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        with anyio.CancelScope(deadline=deadline) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.runs.sender)
                tg.start_soon(self.runs.follow)
                tg.start_soon(self._flusher)
                for _ in range(max(1, min(self._client.max_in_flight, _FETCHERS_MAX))):
                    tg.start_soon(self.runs.fetcher)
                await self._finished.wait()
                tg.cancel_scope.cancel()
        if scope.cancelled_caught and not self._finished.is_set():
            self._expired = True
            self.book.expire()
            await self._finished.wait()  # the reader delivers the rest as it stands

    def _check_finished(self) -> None:
        if self._reader_done and self.book.idle and not self._finished.is_set():
            self._finished.set()

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
        self.runs.send_tx.close()
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
                    self.runs.send_tx.send_nowait(row)
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

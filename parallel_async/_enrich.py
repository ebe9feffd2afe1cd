"""``client.enrich``: a table of rows in, the same rows with researched fields out.

`enrich` checks everything before any request and returns an `Enrichment`: iterate it in an
``async with`` block for one `EnrichedRow` per input, or ``await`` it for all of them (a
DataFrame for a DataFrame). The engine is ``_enrich_job``; the journal ``_journal``; what it
hands out, ``_enrich_output``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import AsyncIterable, Callable, Generator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal

import anyio
import anyio.lowlevel
import msgspec

from ._enrich_job import Job, JobSettings
from ._enrich_output import EnrichedRow, EnrichProgress, EnrichSummary, enriched_row
from ._errors import InvalidArgumentError
from ._fields import OutputSpec, job_fingerprint, output_spec
from ._frames import FrameBuilder, check_clashes, frame_columns, frame_kind, frame_rows
from ._journal import Journal

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["DEFAULT_WINDOW", "Enrichment", "enrich", "enrich_sync"]

DEFAULT_WINDOW = 10_000
"""Default `enrich` ``window``: rows read ahead of the oldest row not yet handed out."""

_YIELD_EVERY = 256  # rows handed out in a row before letting the job's tasks run
_ENCODER = msgspec.json.Encoder()


class Enrichment:
    """A prepared enrichment job (from `enrich`): nothing is sent until you use it.

    * ``async with enrichment as rows: async for row in rows: ...`` hands out one
      `EnrichedRow` per input as rows finish (in input order by default); leaving the block
      early stops the job, and what finished is in the journal;
    * ``await enrichment`` returns them all: a list of `EnrichedRow`, or a DataFrame with
      the same rows, order and index for a pandas or polars DataFrame.

    An error that stops the whole job (authentication, credit, the API down) is raised from
    the iteration once the rows before it are handed out; per-row errors never are: they are
    rows with ``_status`` ``failed`` and the reason in ``_error``.
    """

    def __init__(
        self,
        client: AsyncParallel,
        records: Any,
        settings: JobSettings,
        *,
        journal: pathlib.Path | None,
        basis: pathlib.Path | None,
        progress: Callable[[EnrichProgress], object] | None,
    ) -> None:
        self._client = client
        self._records = records
        self._settings = settings
        self._journal_path = journal
        self._basis_path = basis
        self._progress = progress
        self._frame = frame_kind(records)
        self._job: Job | None = None
        self._journal: Journal | None = None
        self._tmpdir: str | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._error: BaseException | None = None
        self._basis_file: IO[str] | None = None
        self._summary: EnrichSummary | None = None
        self._used = False

    @property
    def summary(self) -> EnrichSummary | None:
        """How the job ended; ``None`` until it has."""
        return self._summary

    @property
    def spec(self) -> OutputSpec:
        """The compiled output spec."""
        return self._settings.spec

    async def __aenter__(self) -> AsyncIterable[EnrichedRow]:
        if self._used:
            raise InvalidArgumentError("an Enrichment runs once; call enrich() again")
        self._used = True
        opened = False
        try:
            await self._open()
            opened = True
        finally:
            if not opened:  # not in an except block: no error as a cancellation's context
                await self._close()
        records: Iterable[Any] | AsyncIterable[Any] = self._records
        total = None
        if self._frame is not None:
            records = frame_rows(self._records, self._frame)
            total = len(self._records)
        elif isinstance(self._records, Sequence):
            total = len(self._records)
        assert self._journal is not None  # noqa: S101 - opened just above
        self._job = Job(
            self._client,
            self._journal,
            records,
            self._settings,
            total=total,
            on_progress=None if self._progress is None else self._report,
        )
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._drive)
        return self._rows()

    async def _open(self) -> None:
        path = self._journal_path
        if path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="parallel-async-")
            path = pathlib.Path(self._tmpdir) / "journal.sqlite3"
        self._journal = await Journal.open(path)
        if self._basis_path is not None:
            try:
                self._basis_file = self._basis_path.open("w", encoding="utf-8")
            except OSError as exc:
                raise InvalidArgumentError(
                    f"cannot write the basis file {self._basis_path}: {exc.strerror}"
                ) from None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
                # The block's own exception goes on as itself, never wrapped in a group.
                await self._tg.__aexit__(None, None, None)
        finally:
            await self._close()

    async def _close(self) -> None:
        job = self._job
        if job is not None:
            job.out.close()
        if job is not None and self._summary is None:
            self._summary = EnrichSummary(
                rows=sum(job.delivered[s] for s in ("completed", "failed", "running", "pending")),
                completed=job.delivered["completed"],
                failed=job.delivered["failed"],
                running=job.delivered["running"],
                pending=job.delivered["pending"],
                reused=job.delivered["reused"],
                created=job.created,
                group_id=job.group_id,
                journal=None if self._journal_path is None else str(self._journal_path),
                fingerprint=self._settings.fingerprint,
                elapsed=job.elapsed,
            )
        if self._journal is not None:
            await self._journal.close()
        if self._basis_file is not None:
            self._basis_file.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def _drive(self) -> None:
        assert self._job is not None  # noqa: S101
        try:
            await self._job.run()
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # handed to the consumer at the end of the rows
            self._error = _primary(exc)

    async def _rows(self) -> AsyncIterable[EnrichedRow]:
        job = self._job
        assert job is not None  # noqa: S101
        spec = self._settings.spec
        out = job.out
        streak = 0
        while True:
            # Take what is ready without a trip round the event loop per row; still yield
            # now and then so a long backlog does not starve the job's other tasks.
            try:
                delivery = out.receive_nowait()
            except anyio.WouldBlock:
                delivery = None  # awaited below, outside the except block
            except anyio.EndOfStream:
                break
            if delivery is None:
                try:
                    delivery = await out.receive()
                except anyio.EndOfStream:
                    break
            else:
                streak += 1
                if streak >= _YIELD_EVERY:
                    streak = 0
                    await anyio.lowlevel.checkpoint()
            job.taken()
            row = enriched_row(delivery, spec)
            if self._basis_file is not None and delivery.basis:
                line = {"row": delivery.position, "_run_id": delivery.run_id}
                self._basis_file.write(
                    _ENCODER.encode(
                        {**line, "basis": msgspec.Raw(delivery.basis.encode())}
                    ).decode()
                    + "\n"
                )
            yield row
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _report(self, counts: dict[str, Any]) -> None:
        assert self._progress is not None  # noqa: S101
        self._progress(
            EnrichProgress(
                total=counts["total"],
                read=counts["read"],
                queued=counts["queued"],
                running=counts["running"],
                completed=counts["completed"],
                failed=counts["failed"],
                reused=counts["reused"],
                created=counts["created"],
                elapsed=counts["elapsed"],
            )
        )

    def __await__(self) -> Generator[Any, None, Any]:
        return self._collect().__await__()

    async def _collect(self) -> Any:
        if self._frame is not None:
            builder = FrameBuilder(self._records, self._frame, self._settings.spec)
            async with self as rows:
                async for row in rows:
                    builder.add(row)
            return builder.build()
        async with self as rows:
            return [row async for row in rows]


def _primary(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    cancelled = anyio.get_cancelled_exc_class()
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, cancelled)] or list(exc.exceptions)
        exc = inner[0]
    return exc


def enrich(
    client: AsyncParallel,
    records: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]] | Any,
    *,
    output: Any,
    processor: str,
    journal: str | os.PathLike[str] | None = None,
    columns: Sequence[str] | None = None,
    key: str | None = None,
    order: Literal["input", "completed"] = "input",
    timeout: float | None = None,
    retry_failed: bool = False,
    progress: Callable[[EnrichProgress], object] | None = None,
    basis: str | os.PathLike[str] | None = None,
    window: int = DEFAULT_WINDOW,
) -> Enrichment:
    """Prepare an enrichment: one run per row, each row answered once, even across crashes.

    Args:
        client: the client whose requests it makes (its ``max_in_flight`` bounds them).
        records: dicts (any iterable or async iterable, read lazily), or a pandas or polars
            DataFrame.
        output: what to find for each row: a Struct/dataclass/TypedDict type, a JSON Schema
            (dict or ``pathlib.Path``), the field syntax ``"ceo, founded int: year founded"``
            or a list of field entries (see `output_spec`).
        processor: the processor of every run (``"lite"``, ``"base"``, ``"core"``...).
        journal: the SQLite journal file; run the same job again with the same journal to
            resume it: nothing answered is asked again, no row gets a second run. ``None``: a
            temporary journal, deleted at the end (no resuming).
        columns: the columns that go into each run's input (default: all of the row).
        key: a column naming each row (an id); default: the row's content (of ``columns``).
        order: ``"input"`` (default) or ``"completed"`` (as rows finish). DataFrames always
            come back in input order.
        timeout: seconds for the whole job; rows still running then come out with
            ``_status`` ``running`` (the next invocation picks them up), rows not sent yet
            with ``pending``.
        retry_failed: send the rows the journal holds as failed again (only those).
        progress: called with an `EnrichProgress` at most 10 times a second, and at the end.
        basis: a file to write each answered row's basis to, as JSON lines
            (``{"row": position, "_run_id": ..., "basis": [...]}``).
        window: most rows read ahead of the oldest one not yet handed out (memory bound).

    Raises:
        InvalidArgumentError: a bad argument (`FieldSpecError` for a bad field syntax),
            before any request.
    """
    if isinstance(records, str | bytes | Mapping):
        raise InvalidArgumentError("records must be an iterable of dicts or a DataFrame")
    spec = output_spec(output)
    if not isinstance(processor, str) or not processor:
        raise InvalidArgumentError(f"processor must be a name like 'base', got {processor!r}")
    if order not in ("input", "completed"):
        raise InvalidArgumentError(f"order must be 'input' or 'completed', got {order!r}")
    if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
        raise InvalidArgumentError("timeout must be a positive number of seconds or None")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InvalidArgumentError(f"window must be a positive int, got {window!r}")
    if columns is not None:
        if isinstance(columns, str) or not all(isinstance(c, str) and c for c in columns):
            raise InvalidArgumentError("columns must be a list of column names")
        columns = tuple(columns)
        if not columns:
            raise InvalidArgumentError("columns must name at least one column")
    if key is not None and (not isinstance(key, str) or not key):
        raise InvalidArgumentError("key must be a column name")
    kind = frame_kind(records)
    if kind is not None:
        names = frame_columns(records)
        check_clashes(names, spec)
        missing = [c for c in (*(columns or ()), *([key] if key else [])) if c not in names]
        if missing:
            raise InvalidArgumentError(f"the DataFrame has no column(s) {', '.join(missing)}")
        order = "input"
    settings = JobSettings(
        spec=spec,
        processor=processor,
        fingerprint=job_fingerprint(spec, processor, columns),
        columns=columns,
        key=key,
        order=order,
        timeout=None if timeout is None else float(timeout),
        retry_failed=bool(retry_failed),
        window=window,
        settle=client.task_group.reconcile_settle,
    )
    return Enrichment(
        client,
        records,
        settings,
        journal=None if journal is None else pathlib.Path(journal),
        basis=None if basis is None else pathlib.Path(basis),
        progress=progress,
    )


def enrich_sync(
    records: Iterable[Mapping[str, Any]] | Any,
    *,
    output: Any,
    processor: str,
    journal: str | os.PathLike[str] | None = None,
    columns: Sequence[str] | None = None,
    key: str | None = None,
    order: Literal["input", "completed"] = "input",
    timeout: float | None = None,
    retry_failed: bool = False,
    progress: Callable[[EnrichProgress], object] | None = None,
    basis: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    base_url: str | None = None,
    max_in_flight: int | None = None,
) -> Any:
    """`enrich`, for scripts and notebooks: blocks and returns every row.

    Returns a list of `EnrichedRow` (a DataFrame for a DataFrame). Works where an event loop
    is already running (Jupyter): the job then runs on a worker thread with its own loop.
    The client is made here from ``api_key``, ``base_url`` (defaults: the environment) and
    ``max_in_flight``; the other arguments are `enrich`'s.
    """
    from ._client import DEFAULT_MAX_IN_FLIGHT, AsyncParallel

    async def main() -> Any:
        async with AsyncParallel(
            api_key=api_key,
            base_url=base_url,
            max_in_flight=max_in_flight or DEFAULT_MAX_IN_FLIGHT,
        ) as client:
            return await enrich(
                client,
                records,
                output=output,
                processor=processor,
                journal=journal,
                columns=columns,
                key=key,
                order=order,
                timeout=timeout,
                retry_failed=retry_failed,
                progress=progress,
                basis=basis,
            )

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(main)
    with concurrent.futures.ThreadPoolExecutor(1, "parallel-async enrich") as pool:
        return pool.submit(anyio.run, main).result()

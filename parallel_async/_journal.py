"""The enrichment journal: an SQLite file that makes a job's runs durable.

Plain tables, readable with the ``sqlite3`` tool (the schema is `SCHEMA`, documented in
docs/enrich.md). One file may hold several jobs, one per question (`job_fingerprint`):

* ``jobs``: the question (schema, processor, input columns, key column) and the task group
  that holds its runs;
* ``rows``: one per row key of a job: ``status`` (``intent``: its create is about to be or
  was sent, the run may exist; ``running``: the run exists; ``completed``; ``failed``),
  ``run_id``, ``attempt`` (the create's number, in the run's metadata), ``intent_at`` (wall
  clock of the last create sent), the output and basis (JSON) or the error.

All I/O runs on one worker thread with its own connection, never on the event loop.
Operations queue up and the thread commits whatever is waiting in one transaction (each op
in a savepoint, so one failing op fails alone): under load, writes batch themselves. A
*durable* write (intents) is committed with ``synchronous=FULL`` before its future
resolves; other writes with ``NORMAL`` (WAL: they survive the process being killed, not
necessarily a power loss, and are re-learnt from the API if lost).

The file is created owner-only (0600; SQLite gives its ``-wal``/``-shm`` files the same
mode), and a ``-lock`` file beside it is held (``flock``) while a job runs, so two
processes never drive the same journal. No API key is ever written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import msgspec

from ._errors import JournalError

__all__ = ["FORMAT_VERSION", "SCHEMA", "JobRecord", "Journal", "RowRecord"]

T = TypeVar("T")

FORMAT_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
  name  TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
  fingerprint TEXT PRIMARY KEY,   -- job_fingerprint(spec, processor, columns)
  processor   TEXT NOT NULL,
  schema      TEXT NOT NULL,      -- the output JSON schema
  columns     TEXT,               -- JSON list of input columns, NULL: all
  key_column  TEXT,               -- NULL: rows are named by their content
  group_id    TEXT,               -- the task group holding the job's runs
  created_at  REAL NOT NULL       -- unix time
);
CREATE TABLE IF NOT EXISTS rows (
  job        TEXT NOT NULL REFERENCES jobs (fingerprint),
  key        TEXT NOT NULL,       -- row_key(...): metadata pa_row of its run
  status     TEXT NOT NULL CHECK (status IN ('intent', 'running', 'completed', 'failed')),
  run_id     TEXT,
  attempt    INTEGER NOT NULL,    -- creates sent for this row: metadata pa_try of its run
  intent_at  REAL,                -- unix time its last create was about to be sent
  output     TEXT,                -- JSON content of the output (completed)
  basis      TEXT,                -- JSON list of {field, reasoning, citations, confidence}
  error      TEXT,                -- why it failed (failed)
  updated_at REAL NOT NULL,
  PRIMARY KEY (job, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rows_by_status ON rows (job, status);
"""
_LOOKUP = (
    "SELECT key, status, run_id, attempt, intent_at, output, basis, error "
    "FROM rows WHERE job = ? AND key IN "
)
# One statement per batch (its rows read from a JSON array) instead of one step per row: the
# worker then trades the GIL with the event loop once per batch, not once per row. An upsert
# over json_each walks the array and finds each row by its key; the rows exist already (their
# intent came first), so it always updates. The JSON functions are built in since SQLite 3.38.
_ONE_STATEMENT = sqlite3.sqlite_version_info >= (3, 38, 0)
_LOOKUP_JSON = (
    "SELECT coalesce(json_group_array(json_array(key, status, run_id, attempt, intent_at, "
    "output, basis, error)), '[]') FROM rows "
    "WHERE job = ? AND key IN (SELECT value FROM json_each(?))"
)
_INTENTS_FROM_JSON = (
    "INSERT INTO rows (job, key, status, attempt, intent_at, updated_at) "
    "SELECT ?3, json_extract(value, '$[0]'), 'intent', json_extract(value, '$[1]'), ?1, ?1 "
    "FROM json_each(?2) WHERE true ON CONFLICT (job, key) DO UPDATE SET status = 'intent', "
    "run_id = NULL, attempt = excluded.attempt, intent_at = excluded.intent_at, output = NULL, "
    "basis = NULL, error = NULL, updated_at = excluded.updated_at"
)
_RUNS_FROM_JSON = (
    "INSERT INTO rows (job, key, status, run_id, attempt, updated_at) "
    "SELECT ?3, json_extract(value, '$[0]'), 'running', json_extract(value, '$[1]'), 0, ?1 "
    "FROM json_each(?2) WHERE true ON CONFLICT (job, key) DO UPDATE SET status = 'running', "
    "run_id = excluded.run_id, updated_at = excluded.updated_at "
    "WHERE rows.status IN ('intent', 'running')"
)
_OUTCOMES_FROM_JSON = (
    "INSERT INTO rows (job, key, status, output, basis, error, attempt, updated_at) "
    "SELECT ?3, json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]'), "
    "0, ?1 FROM json_each(?2) WHERE true ON CONFLICT (job, key) DO UPDATE SET "
    "status = excluded.status, output = excluded.output, basis = excluded.basis, "
    "error = excluded.error, updated_at = excluded.updated_at"
)
_JSON = msgspec.json.Encoder()
_ROWS = msgspec.json.Decoder(
    list[tuple[str, str, str | None, int, float | None, str | None, str | None, str | None]]
)
_BATCH = 512  # most operations committed in one transaction
_CHUNK = 500  # keys per lookup query


@dataclass(frozen=True)
class JobRecord:
    """A job row: its question and its task group (``None`` until created)."""

    fingerprint: str
    processor: str
    schema: dict[str, Any]
    columns: list[str] | None
    key_column: str | None
    group_id: str | None
    created_at: float


@dataclass(frozen=True)
class RowRecord:
    """What the journal knows of one row key."""

    key: str
    status: str
    run_id: str | None
    attempt: int
    intent_at: float | None
    output: str | None = None
    basis: str | None = None
    error: str | None = None


@dataclass
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    durable: bool
    done: Callable[[Any, BaseException | None], None] | None


class Journal:
    """An open journal file. Use ``async with await Journal.open(path):`` or `close`.

    Every method is called from the event loop; the work happens on the worker thread.
    """

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._error: BaseException | None = None
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, create: bool = True) -> Journal:
        """Open (or create) the journal at ``path`` and take its lock.

        Raises:
            JournalError: the file is not a journal, is newer, is locked by another process,
                or cannot be created.
        """
        journal = cls(pathlib.Path(path))
        journal._lock()
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        journal._thread = threading.Thread(
            target=journal._work, args=(create, _resolver(ready)), daemon=True,
            name=f"parallel-async journal {journal.path.name}",
        )  # fmt: skip
        journal._thread.start()
        try:
            await ready
        except BaseException:
            journal._closed = True
            journal._queue.put(None)  # if the worker did connect (we were cancelled): end it
            journal._unlock()
            raise
        return journal

    async def __aenter__(self) -> Journal:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Commit what is queued (durably), stop the thread, release the lock. Idempotent.

        Shielded from cancellation: what was written before is never left half-queued.
        """
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        with anyio.CancelScope(shield=True):
            if thread is not None and thread.is_alive():
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._queue.put(_Op(lambda conn: None, True, _resolver(done)))
                self._queue.put(None)
                with contextlib.suppress(JournalError):
                    await done
            self._unlock()

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock, documented
            return
        lock_path = self.path.with_name(self.path.name + "-lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot create the journal {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalError(
                f"the journal {self.path} is in use by another process; wait for it to end "
                "(or give this job another --journal)"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    # --- the worker thread ----------------------------------------------------------------------

    def _connect(self, create: bool) -> sqlite3.Connection:
        if not create and not self.path.exists():
            raise JournalError(f"no journal at {self.path}")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(self.path, 0o600)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except OSError as exc:
            raise JournalError(f"cannot open the journal {self.path}: {exc.strerror}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            _prepare(conn, self.path)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise JournalError(f"{self.path} is not a journal ({exc})") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _work(self, create: bool, ready: Callable[[Any, BaseException | None], None]) -> None:
        try:
            conn = self._connect(create)
        except BaseException as exc:
            ready(None, exc)
            return
        ready(None, None)
        try:
            stop = False
            while not stop:
                ops: list[_Op] = []
                first = self._queue.get()
                if first is None:
                    break
                ops.append(first)
                while len(ops) < _BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    ops.append(nxt)
                self._run_batch(conn, ops)
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        results: list[tuple[_Op, Any, BaseException | None]] = []
        durable = any(op.durable for op in ops)
        try:
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            conn.execute("BEGIN IMMEDIATE")
            for op in ops:
                conn.execute("SAVEPOINT op")
                try:
                    value = op.fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    results.append((op, None, _journal_error(self.path, exc)))
                else:
                    results.append((op, value, None))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            failed = _journal_error(self.path, exc)
            self._error = failed
            results = [(op, None, failed) for op in ops]
        for op, value, error in results:
            if op.done is not None:
                op.done(value, error)

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """Run ``fn`` on the worker (batched with what else is queued) and await it."""
        if self._closed:
            raise JournalError(f"the journal {self.path} is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Op(fn, durable, _resolver(future)))
        return await future

    def _post(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        """Queue a write without waiting for it (it commits with the next batch)."""
        if self._closed:
            raise JournalError(f"the journal {self.path} is closed")
        if self._error is not None:
            raise self._error
        self._queue.put(_Op(fn, False, None))

    # --- jobs -----------------------------------------------------------------------------------

    async def job(
        self,
        fingerprint: str,
        *,
        processor: str,
        schema: dict[str, Any],
        columns: Sequence[str] | None,
        key_column: str | None,
        create: bool = True,
    ) -> JobRecord | None:
        """The job with this fingerprint, created when missing (unless ``create`` is off)."""

        def get(conn: sqlite3.Connection) -> JobRecord | None:
            row = conn.execute(
                "SELECT fingerprint, processor, schema, columns, key_column, group_id, "
                "created_at FROM jobs WHERE fingerprint = ?",
                (fingerprint,),
            ).fetchone()
            if row is None and create:
                row = (
                    fingerprint,
                    processor,
                    json.dumps(schema),
                    None if columns is None else json.dumps(list(columns)),
                    key_column,
                    None,
                    time.time(),
                )
                conn.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            if row is None:
                return None
            return JobRecord(
                fingerprint=row[0],
                processor=row[1],
                schema=json.loads(row[2]),
                columns=None if row[3] is None else json.loads(row[3]),
                key_column=row[4],
                group_id=row[5],
                created_at=row[6],
            )

        return await self._call(get, durable=create)

    async def set_group(self, fingerprint: str, group_id: str) -> None:
        """Record the job's task group (durably: runs are only ever added to this one)."""

        def put(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE jobs SET group_id = ? WHERE fingerprint = ?", (group_id, fingerprint)
            )

        await self._call(put, durable=True)

    # --- rows -----------------------------------------------------------------------------------

    async def lookup(self, fingerprint: str, keys: Sequence[str]) -> dict[str, RowRecord]:
        """What the journal knows of these keys (absent keys are not in the result)."""

        def get(conn: sqlite3.Connection) -> dict[str, RowRecord]:
            found: dict[str, RowRecord] = {}
            if _ONE_STATEMENT:  # all the rows in one JSON text: one step
                payload = _JSON.encode(list(keys)).decode()
                (text,) = conn.execute(_LOOKUP_JSON, (fingerprint, payload)).fetchone()
                for row in _ROWS.decode(text):
                    found[row[0]] = RowRecord(*row)
                return found
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                query = _LOOKUP + f"({marks})"  # only "?" marks go into the text
                for row in conn.execute(query, (fingerprint, *chunk)):
                    found[row[0]] = RowRecord(*row)
            return found

        return await self._call(get)

    async def unsettled(self, fingerprint: str) -> list[RowRecord]:
        """Rows of the job with a create sent and no outcome: ``intent`` and ``running``."""

        def get(conn: sqlite3.Connection) -> list[RowRecord]:
            return [
                RowRecord(*row)
                for row in conn.execute(
                    "SELECT key, status, run_id, attempt, intent_at, NULL, NULL, NULL "
                    "FROM rows WHERE job = ? AND status IN ('intent', 'running')",
                    (fingerprint,),
                )
            ]

        return await self._call(get)

    async def counts(self, fingerprint: str) -> dict[str, int]:
        """Rows of the job per status."""

        def get(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(
                conn.execute(
                    "SELECT status, count(*) FROM rows WHERE job = ? GROUP BY status",
                    (fingerprint,),
                ).fetchall()
            )

        return await self._call(get)

    async def write_intents(
        self, fingerprint: str, intents: Iterable[tuple[str, int]], at: float
    ) -> None:
        """Record, durably, that creates for these (key, attempt) are about to be sent.

        Returns once committed: only then may the request go out.
        """
        rows = [(fingerprint, key, attempt, at, at) for key, attempt in intents]

        def put(conn: sqlite3.Connection) -> None:
            if _ONE_STATEMENT:
                payload = _JSON.encode([(key, attempt) for _, key, attempt, _, _ in rows])
                conn.execute(_INTENTS_FROM_JSON, (at, payload.decode(), fingerprint))
                return
            conn.executemany(
                "INSERT INTO rows (job, key, status, attempt, intent_at, updated_at) "
                "VALUES (?, ?, 'intent', ?, ?, ?) ON CONFLICT (job, key) DO UPDATE SET "
                "status = 'intent', run_id = NULL, attempt = excluded.attempt, "
                "intent_at = excluded.intent_at, output = NULL, basis = NULL, error = NULL, "
                "updated_at = excluded.updated_at",
                rows,
            )

        await self._call(put, durable=True)

    def record_runs(self, fingerprint: str, runs: Iterable[tuple[str, str]]) -> None:
        """Queue: these (key, run id) exist (rows still ``intent`` become ``running``)."""
        now = time.time()
        items = list(runs)

        def put(conn: sqlite3.Connection) -> None:
            if _ONE_STATEMENT:
                payload = _JSON.encode(items).decode()
                conn.execute(_RUNS_FROM_JSON, (now, payload, fingerprint))
                return
            conn.executemany(
                "UPDATE rows SET status = 'running', run_id = ?, updated_at = ? "
                "WHERE job = ? AND key = ? AND status IN ('intent', 'running')",
                [(run_id, now, fingerprint, key) for key, run_id in items],
            )

        self._post(put)

    def record_outcomes(
        self, fingerprint: str, outcomes: Iterable[tuple[str, str, str | None, str | None, str]]
    ) -> None:
        """Queue outcomes: (key, status, output JSON or None, basis JSON or None, error)."""
        now = time.time()
        items = list(outcomes)

        def put(conn: sqlite3.Connection) -> None:
            if _ONE_STATEMENT:  # output and basis are JSON already: spliced in, not quoted
                payload = "[" + ",".join(
                    f"[{_text(key)},{_text(status)},{output or 'null'},{basis or 'null'},"
                    f"{_text(error or None)}]"
                    for key, status, output, basis, error in items
                ) + "]"  # fmt: skip
                conn.execute(_OUTCOMES_FROM_JSON, (now, payload, fingerprint))
                return
            conn.executemany(
                "UPDATE rows SET status = ?, output = ?, basis = ?, error = ?, updated_at = ? "
                "WHERE job = ? AND key = ?",
                [
                    (status, output, basis, error or None, now, fingerprint, key)
                    for key, status, output, basis, error in items
                ],
            )

        self._post(put)

    async def flush(self) -> None:
        """Wait until every queued write is committed (durably)."""
        await self._call(lambda conn: None, durable=True)


def _text(value: str | None) -> str:
    return _JSON.encode(value).decode()


def _resolver(future: asyncio.Future[Any]) -> Callable[[Any, BaseException | None], None]:
    """A thread-safe callback settling ``future`` on its loop (ignored once the loop closed)."""
    loop = future.get_loop()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def done(value: Any, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, value, error)

    return done


def _prepare(conn: sqlite3.Connection, path: pathlib.Path) -> None:
    """Create the tables of a new journal; refuse one of a newer format."""
    version = _read_version(conn)
    if version is None:
        conn.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
        conn.execute(
            "INSERT OR IGNORE INTO meta VALUES ('format', ?), ('created_at', ?)",
            (str(FORMAT_VERSION), str(time.time())),
        )
    elif version > FORMAT_VERSION:
        raise JournalError(
            f"the journal {path} was written by a newer parallel-async (format {version}); "
            "upgrade parallel-async"
        )


def _read_version(conn: sqlite3.Connection) -> int | None:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return None
    if not {"meta", "jobs", "rows"} <= tables:
        raise sqlite3.DatabaseError("it has tables, but not a journal's (meta, jobs, rows)")
    row = conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
    return int(row[0]) if row is not None else None


def _journal_error(path: pathlib.Path, exc: BaseException) -> JournalError:
    if isinstance(exc, JournalError):
        return exc
    return JournalError(f"writing the journal {path} failed: {exc}")

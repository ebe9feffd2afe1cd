"""The journal file and its worker thread: opening, the lock, batched transactions.

All I/O runs on one worker thread with its own connection, never on the event loop.
Operations queue up and the thread commits whatever is waiting in one transaction (each op
in a savepoint, so one failing op fails alone): under load, writes batch themselves. A
*durable* write (intents) is committed with ``synchronous=FULL`` before its future
resolves; other writes with ``NORMAL`` (WAL: they survive the process being killed, not
necessarily a power loss, and are re-learnt from the API if lost).

The file is created owner-only (0600; SQLite gives its ``-wal``/``-shm`` files the same
mode), and a ``-lock`` file beside it is held (``flock``) while a job runs, so two
processes never drive the same journal. The tables are ``_journal_schema``'s; what is read
and written, ``_journal``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from ._errors import JournalError
from ._journal_schema import prepare

__all__ = ["JournalStore"]

T = TypeVar("T")
S = TypeVar("S", bound="JournalStore")

_BATCH = 512  # most operations committed in one transaction


@dataclass
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    durable: bool
    done: Callable[[Any, BaseException | None], None] | None


class JournalStore:
    """An open journal file and its worker thread (`Journal` adds what is read and written).

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
    async def open(cls: type[S], path: str | os.PathLike[str], *, create: bool = True) -> S:
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

    async def __aenter__(self: S) -> S:
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
            prepare(conn, self.path)
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


def _journal_error(path: pathlib.Path, exc: BaseException) -> JournalError:
    if isinstance(exc, JournalError):
        return exc
    return JournalError(f"writing the journal {path} failed: {exc}")

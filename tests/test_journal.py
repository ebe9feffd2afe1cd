"""The enrichment journal: durable, batched, owner-only, locked, plain SQLite."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sqlite3
import stat
import subprocess
import threading

import pytest

from parallel_async import JournalError, _journal
from parallel_async._journal import Journal

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True, params=["one statement", "a step per row"])
def _statements(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of writing a batch: JSON-fed statements (SQLite >= 3.38) and executemany."""
    if request.param == "a step per row":
        monkeypatch.setattr(_journal, "_ONE_STATEMENT", False)


SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}}


async def _job(journal: Journal, fp: str = "fp1") -> None:
    await journal.job(fp, processor="lite", schema=SCHEMA, columns=["a"], key_column=None)


async def test_a_job_round_trip(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "j.sqlite3"
    async with await Journal.open(path) as journal:
        job = await journal.job(
            "fp1", processor="lite", schema=SCHEMA, columns=None, key_column="id"
        )
        assert job is not None
        assert (job.group_id, job.columns, job.key_column) == (None, None, "id")
        await journal.set_group("fp1", "tgrp_1")
        await journal.write_intents("fp1", [("k1", 1), ("k2", 1), ("k3", 1)], 100.0)
        journal.record_runs("fp1", [("k1", "trun_1"), ("k2", "trun_2")])
        journal.record_outcomes("fp1", [("k1", "completed", '{"a": "x"}', "[]", "")])
        journal.record_outcomes("fp1", [("k2", "failed", None, None, "no sources")])
        found = await journal.lookup("fp1", ["k1", "k2", "k3", "k4"])
        assert set(found) == {"k1", "k2", "k3"}
        assert (found["k1"].status, found["k1"].run_id) == ("completed", "trun_1")
        assert json.loads(found["k1"].output or "") == {"a": "x"}
        assert (found["k2"].status, found["k2"].error) == ("failed", "no sources")
        assert (found["k3"].status, found["k3"].run_id, found["k3"].intent_at) == (
            "intent",
            None,
            100.0,
        )
        assert await journal.counts("fp1") == {"completed": 1, "failed": 1, "intent": 1}
        assert [r.key for r in await journal.unsettled("fp1")] == ["k3"]
        # a retried row: a new intent with the next attempt clears the old outcome
        await journal.write_intents("fp1", [("k2", 2)], 200.0)
        again = (await journal.lookup("fp1", ["k2"]))["k2"]
        assert (again.status, again.attempt, again.error, again.run_id) == ("intent", 2, None, None)
        assert await journal.lookup("other", ["k1"]) == {}
    async with await Journal.open(path) as journal:  # reopened: all there
        job = await journal.job("fp1", processor="x", schema={}, columns=None, key_column=None)
        assert job is not None
        assert (job.group_id, job.processor, job.schema) == ("tgrp_1", "lite", SCHEMA)
        assert await journal.job("fp2", processor="x", schema={}, columns=None,
                                 key_column=None, create=False) is None  # fmt: skip


async def test_queued_writes_are_committed_by_close(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = await Journal.open(path)
    await _job(journal)
    await journal.write_intents("fp1", [(f"k{i}", 1) for i in range(5000)], 1.0)
    for i in range(5000):  # one small write each: the worker batches them
        journal.record_runs("fp1", [(f"k{i}", f"trun_{i}")])
    await journal.close()
    await journal.close()  # idempotent
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM rows WHERE status = 'running'").fetchone() == (
            5000,
        )
    with pytest.raises(JournalError, match="closed"):
        await journal.lookup("fp1", ["k1"])


async def test_work_happens_off_the_event_loop(tmp_path: pathlib.Path) -> None:
    async with await Journal.open(tmp_path / "j.sqlite3") as journal:
        where = await journal._call(lambda conn: threading.current_thread())
        assert where is not threading.current_thread()
        assert where.name.startswith("parallel-async journal")


async def test_owner_only_wal_and_no_key(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "j.sqlite3"
    os.umask(0o022)
    async with await Journal.open(path) as journal:
        await _job(journal)
        await journal.write_intents("fp1", [("k", 1)], 1.0)
        for name in (path, pathlib.Path(f"{path}-wal"), pathlib.Path(f"{path}-shm")):
            assert stat.S_IMODE(name.stat().st_mode) == 0o600, name
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_an_existing_wide_file_is_narrowed(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "j.sqlite3"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    async with await Journal.open(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="no sqlite3 command")
async def test_readable_with_the_sqlite3_tool(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "j.sqlite3"
    async with await Journal.open(path) as journal:
        await _job(journal)
        await journal.write_intents("fp1", [("k1", 1)], 1.0)
        journal.record_runs("fp1", [("k1", "trun_1")])
        await journal.flush()
        # while the job holds it open, too
        out = subprocess.run(  # noqa: ASYNC221, S603 - a test of the file, not the loop
            ["sqlite3", str(path), "SELECT key, status, run_id FROM rows"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == "k1|running|trun_1"


async def test_one_process_at_a_time(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "j.sqlite3"
    async with await Journal.open(path):
        with pytest.raises(JournalError, match="in use by another process"):
            await Journal.open(path)
    async with await Journal.open(path):  # released
        pass


async def test_not_a_journal(tmp_path: pathlib.Path) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database at all, certainly not SQLite" * 100)
    with pytest.raises(JournalError, match="not a journal"):
        await Journal.open(garbage)
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(JournalError, match="not a journal"):
        await Journal.open(other)
    with pytest.raises(JournalError, match="no journal"):
        await Journal.open(tmp_path / "missing.sqlite3", create=False)
    with pytest.raises(JournalError, match="cannot"):
        await Journal.open(tmp_path / "no" / "such" / "dir.sqlite3")


async def test_a_newer_format_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "j.sqlite3"
    async with await Journal.open(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE name = 'format'")
    with pytest.raises(JournalError, match="newer"):
        await Journal.open(path)


async def test_a_failing_write_fails_alone(tmp_path: pathlib.Path) -> None:
    async with await Journal.open(tmp_path / "j.sqlite3") as journal:
        await _job(journal)

        def bad(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO rows (job, key, status, attempt, updated_at) "
                         "VALUES ('fp1', 'x', 'bogus', 1, 0)")  # fmt: skip

        with pytest.raises(JournalError, match="CHECK"):
            await journal._call(bad)
        await journal.write_intents("fp1", [("k", 1)], 1.0)
        assert (await journal.counts("fp1")) == {"intent": 1}

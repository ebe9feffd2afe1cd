"""Crash and resume: ``parallel-async enrich`` SIGKILLed again and again, never pays twice.

A fake server runs as its own process: runs take 20-80 ms, an add of runs takes 0.25 s before
its runs exist (and goes on when the client hangs up), and a quarter of the adds lose their
answer after being processed. The enrich command runs as a subprocess and is killed with
SIGKILL at 26 moments: early (start-up, journal open, first reads), right after a batch's
intents are committed (its add in flight: mid-create), right as the journal file grows
(mid-write), and at spread-out times; then it is run until it ends. Afterwards the server has
created exactly one run per row and the output holds every row once, in input order.
"""

from __future__ import annotations

import csv
import os
import pathlib
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEY = "crash-key"
ROWS = 1600


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    log = tmp_path / "requests.jsonl"
    proc = subprocess.Popen(  # noqa: S603 - our own command
        [sys.executable, "-m", "parallel_async", "fake-server", "--port", "0",
         "--api-key", KEY, "--duration", "0.02-0.08", "--add-delay", "0.25",
         "--drop-after-create", "0.25", "--seed", "3", "--request-log", str(log)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://" in line, line
        url = line.split("listening on ")[1].split()[0]
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _journal_rows(path: pathlib.Path) -> int:
    """Rows the journal holds (each written as an intent first); 0 if unreadable yet."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.05) as conn:
            return int(conn.execute("SELECT count(*) FROM rows").fetchone()[0])
    except sqlite3.Error:
        return 0


def _wal_stamp(path: pathlib.Path) -> int:
    """When the journal's WAL was last written (ns; -1 before it exists)."""
    try:
        return os.stat(f"{path}-wal").st_mtime_ns
    except OSError:
        return -1


def _wait(condition: Callable[[], bool], proc: subprocess.Popen[bytes], limit: float) -> bool:
    """Poll ``condition`` until it holds, the process ends, or ``limit`` seconds pass."""
    end = time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.002)
    return False


def test_sigkill_at_any_moment_never_creates_a_second_run(
    tmp_path: pathlib.Path, server: tuple[str, subprocess.Popen[str]]
) -> None:
    url, server_proc = server
    source = tmp_path / "in.csv"
    with source.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name", "note"])
        for i in range(ROWS):
            writer.writerow([i, f"Société {i} ✓", "two\nlines, and a comma" if i % 50 == 0 else ""])
    out = tmp_path / "out.csv"
    journal = tmp_path / "out.csv.journal.sqlite3"
    command = [
        sys.executable, "-m", "parallel_async", "enrich", str(source), "-o", str(out),
        "--fields", "ceo: the CEO, founded int", "--key", "id", "--window", "80",
        "--max-in-flight", "32", "--reconcile-settle", "1.5", "--json",
    ]  # fmt: skip
    env = _env(PARALLEL_BASE_URL=url, PARALLEL_API_KEY=KEY)
    rng = random.Random(11)

    def early(delay: float) -> Callable[[subprocess.Popen[bytes]], str]:
        def moment(proc: subprocess.Popen[bytes]) -> str:
            time.sleep(delay)
            return f"early {delay}s"

        return moment

    def mid_create(proc: subprocess.Popen[bytes]) -> str:
        before = _journal_rows(journal)
        # a new batch's intents are committed: its add goes out now and takes 0.25 s
        fired = _wait(lambda: _journal_rows(journal) > before, proc, 8.0)
        time.sleep(rng.uniform(0.01, 0.2))
        return "mid-create" if fired else "mid-create (not reached)"

    def mid_write(proc: subprocess.Popen[bytes]) -> str:
        _wait(lambda: _wal_stamp(journal) > 0, proc, 5.0)
        stamp = _wal_stamp(journal)
        fired = _wait(lambda: _wal_stamp(journal) != stamp, proc, 5.0)
        return "mid-write" if fired else "mid-write (not reached)"

    def spread(proc: subprocess.Popen[bytes]) -> str:
        delay = rng.uniform(0.6, 1.5)
        time.sleep(delay)
        return f"at {delay:.2f}s"

    schedule = [early(d) for d in (0.05, 0.2, 0.4, 0.6)]
    schedule += [mid_create, mid_write, mid_create, spread, mid_write] * 4 + [mid_create] * 2
    moments: list[str] = []
    for moment in schedule:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,  # noqa: S603
                                stderr=subprocess.DEVNULL)  # fmt: skip
        what = moment(proc)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            moments.append(what)
        proc.wait(10)
        assert server_proc.poll() is None
        if journal.exists():
            with sqlite3.connect(journal) as conn:  # the journal survives every kill intact
                assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert len(moments) >= 20, moments
    assert sum(m == "mid-create" for m in moments) >= 3, moments
    assert sum(m == "mid-write" for m in moments) >= 3, moments

    for _ in range(5):  # restarted until done
        done = subprocess.run(  # noqa: S603
            command, check=False, env=env, capture_output=True, text=True, timeout=120
        )
        if done.returncode == 0:
            break
    assert done.returncode == 0, done.stderr

    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [str(i) for i in range(ROWS)]
    assert {r["_status"] for r in rows} == {"completed"}
    assert rows[50]["note"] == "two\nlines, and a comma"
    assert rows[7]["name"] == "Société 7 ✓"
    assert len({r["_run_id"] for r in rows}) == ROWS

    server_proc.send_signal(signal.SIGTERM)
    tail, _ = server_proc.communicate(timeout=10)
    assert f"created {ROWS} runs" in tail, tail  # one run per row: none created twice
    log = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert any('"group_add_runs"' in line and '"cancelled"' in line for line in log)
    assert any('"group_add_runs"' in line and '"dropped"' in line for line in log)

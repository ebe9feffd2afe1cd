"""The journal's tables and format: `SCHEMA`, `FORMAT_VERSION`, and preparing a file.

Plain tables, readable with the ``sqlite3`` tool (documented in docs/enrich.md). One file may
hold several jobs, one per question (`job_fingerprint`):

* ``jobs``: the question (schema, processor, input columns, key column) and the task group
  that holds its runs;
* ``rows``: one per row key of a job: ``status`` (``intent``: its create is about to be or
  was sent, the run may exist; ``running``: the run exists; ``completed``; ``failed``),
  ``run_id``, ``attempt`` (the create's number, in the run's metadata), ``intent_at`` (wall
  clock of the last create sent), the output and basis (JSON) or the error.

`prepare` creates the tables of a new file and refuses one of a newer format.
"""

from __future__ import annotations

import pathlib
import sqlite3
import time

from ._errors import JournalError

__all__ = ["FORMAT_VERSION", "SCHEMA", "prepare"]

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


def prepare(conn: sqlite3.Connection, path: pathlib.Path) -> None:
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

"""The enrichment journal: an SQLite file that makes a job's runs durable.

`Journal` is what a job reads and writes: its job row (question and task group), what is
known of its row keys, intents (durably, before a create is sent), runs and outcomes
(queued, committed in batches). The tables and their format are ``_journal_schema``'s
(`SCHEMA`, documented in docs/enrich.md); the file, its lock and the worker thread that runs
every operation, ``_journal_store``'s. No API key is ever written.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ._journal_store import JournalStore

__all__ = ["JobRecord", "Journal", "RowRecord"]

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


class Journal(JournalStore):
    """An open journal file. Use ``async with await Journal.open(path):`` or `close`.

    Every method is called from the event loop; the work happens on the worker thread.
    """

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

"""The rows of one enrichment job in memory: synchronous, no I/O.

The book knows which input positions wait on which row key, what each row key is doing
(``Row.state``), and what is ready to hand out, in input or completion order. The job's I/O
tasks tell it facts (a row was read, a run was created, a run ended) and it answers what to do
(send this row) and queues the deliveries; so its rules are tested without a server.

Row states: ``new`` (read, not yet queued) -> ``send`` (queued for an add) -> ``intent`` (its
create is sent, its run unknown) -> ``running`` -> ``fetch`` (completed, result being fetched)
-> ``done``. ``orphan``: an earlier process's intent that was never created (sent again if
its row is read). Input rows count as ``queued`` (their row key is ``send``) or ``running``
(``intent``, ``running`` or ``fetch``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._journal import RowRecord

__all__ = ["BadRecord", "Delivery", "Row", "RowBook"]

_DECODER = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()
_QUEUED = frozenset({"send"})
_RUNNING = frozenset({"intent", "running", "fetch"})
_UNSENT = frozenset({"new", "send", "orphan"})

Outcome = tuple[str, str, str | None, str | None, str]
"""What the journal records of a settled row: key, status, output JSON, basis JSON, error."""


class BadRecord(msgspec.Struct, frozen=True):
    """An input line that could not be read as a record: delivered as failed, never sent."""

    error: str


class Delivery(msgspec.Struct):
    """One input row's outcome, handed to the consumer."""

    position: int
    record: Any  # the input record (a Mapping), or a BadRecord
    status: str  # completed | failed | running | pending
    output: Any = None  # the output content (a dict) when completed
    basis: str | None = None  # JSON list of the fields' basis
    error: str | None = None
    run_id: str | None = None
    reused: bool = False  # answered from the journal, no run awaited this time


class Row:
    """One row key of the job (several input rows with equal keys share it)."""

    __slots__ = (
        "attempt", "basis", "error", "input", "key", "outcome", "output", "run_id", "state",
    )  # fmt: skip

    def __init__(self, key: str, attempt: int, state: str, run_id: str | None = None) -> None:
        self.key = key
        self.attempt = attempt
        self.state = state
        self.run_id = run_id
        self.input: Any = None  # the run's input, until it is sent
        self.outcome: str | None = None  # once done: completed | failed | running
        self.output: Any = None
        self.basis: str | None = None
        self.error: str | None = None


class RowBook:
    """The job's rows and deliveries; ``out`` yields the deliveries in order.

    Args:
        order: ``"input"`` or ``"completed"``.
        on_deliver: called after each delivery (the job checks whether it is done).
    """

    def __init__(self, order: str, on_deliver: Callable[[], None]) -> None:
        self.rows: dict[str, Row] = {}
        self._order = order
        self._on_deliver = on_deliver
        self._waiting: dict[int, tuple[Any, str]] = {}  # position -> (record, key)
        self._by_key: dict[str, list[int]] = {}  # key -> positions waiting on it
        self._ready: dict[int, Delivery] = {}  # settled, waiting for earlier positions
        self._next = 0
        self.counts = {"queued": 0, "running": 0}  # input rows waiting, by what for
        self.delivered = {"completed": 0, "failed": 0, "running": 0, "pending": 0, "reused": 0}
        self.outcomes: list[Outcome] = []  # to journal
        tx, rx = anyio.create_memory_object_stream[Delivery](math.inf)
        self._tx: MemoryObjectSendStream[Delivery] = tx
        self.out: MemoryObjectReceiveStream[Delivery] = rx

    @property
    def idle(self) -> bool:
        """No input row is waiting for its outcome."""
        return not self._waiting

    def close(self) -> None:
        """No more deliveries: the consumer's iteration ends after the queued ones."""
        self._tx.close()

    # --- facts in -------------------------------------------------------------------------------

    def place(
        self,
        position: int,
        record: Any,
        key: str,
        run_input: Any,
        rec: RowRecord | None,
        *,
        retry_failed: bool,
    ) -> Row | None:
        """A row was read (``rec``: what the journal knows of its key).

        Returns the row key to send now, if it needs a run.
        """
        row = self.rows.get(key)
        if row is None:
            if rec is not None and (
                rec.status == "completed" or (rec.status == "failed" and not retry_failed)
            ):
                self._deliver(_from_record(position, record, rec))
                return None
            if rec is not None and rec.status in ("intent", "running"):
                # a run whose result this process could not fetch: never sent twice
                self._deliver(Delivery(position, record, "running", run_id=rec.run_id))
                return None
            attempt = rec.attempt + 1 if rec is not None else 1  # failed: its next attempt
            row = Row(key, attempt, "new")
            self.rows[key] = row
        if row.state == "done":  # an earlier process's run ended before its row was read
            del self.rows[key]
            self._deliver(_settled(position, record, row, reused=True))
            return None
        self._waiting[position] = (record, key)
        self._by_key.setdefault(key, []).append(position)
        if row.state in ("new", "orphan"):
            row.input = run_input
            self.move(row, "send")
            return row
        self._bucket_add(row, 1)
        return None

    def fail(self, position: int, record: Any, error: str) -> None:
        """A row that cannot be sent (unreadable, no key, too big): failed, never sent."""
        self._deliver(Delivery(position, record, "failed", error=error))

    def after_deadline(self, position: int, record: Any, key: str, rec: RowRecord | None) -> None:
        """A row read after the deadline: delivered as it stands, never sent."""
        row = self.rows.get(key)
        if row is not None and row.state == "done":
            self._deliver(_settled(position, record, row, reused=True))
        elif row is not None:
            self._deliver(_unsettled(position, record, row))
        elif rec is not None and rec.status in ("completed", "failed"):
            self._deliver(_from_record(position, record, rec))
        elif rec is not None:
            self._deliver(Delivery(position, record, "running", run_id=rec.run_id))
        else:
            self._deliver(Delivery(position, record, "pending"))

    def move(self, row: Row, state: str) -> None:
        """Change a row's state, keeping the counts of waiting input rows."""
        n = len(self._by_key.get(row.key, ()))
        self._bucket_add(row, -n)
        row.state = state
        self._bucket_add(row, n)

    def settle(
        self,
        row: Row,
        status: str,
        *,
        output: Any = None,
        basis: str | None = None,
        error: str | None = None,
    ) -> None:
        """``row`` has its outcome: queue it for the journal (unless ``running``: its run
        is still to be read next time) and deliver the input rows waiting on it."""
        self.move(row, "done")
        row.outcome, row.output, row.basis, row.error = status, output, basis, error
        if status != "running":
            text = None if output is None else _ENCODER.encode(output).decode()
            self.outcomes.append((row.key, status, text, basis, error or ""))
        positions = self._by_key.pop(row.key, None)
        if not positions:
            if status == "running":
                self.rows.pop(row.key, None)
            return  # kept: an earlier process's run whose row has not been read (yet)
        self.rows.pop(row.key, None)
        for position in positions:
            record, _ = self._waiting.pop(position)
            self._deliver(_settled(position, record, row, reused=False))

    def first_record(self, key: str) -> Any:
        """An input record waiting on ``key`` (to rebuild its input), else ``None``."""
        positions = self._by_key.get(key)
        return self._waiting[positions[0]][0] if positions else None

    def expire(self) -> None:
        """The deadline passed: every input row still waiting is delivered as it stands."""
        waiting, self._waiting = self._waiting, {}
        self._by_key.clear()
        self.counts["queued"] = self.counts["running"] = 0
        for position, (record, key) in sorted(waiting.items()):
            self._deliver(_unsettled(position, record, self.rows[key]))
        self._on_deliver()

    # --- inside ---------------------------------------------------------------------------------

    def _bucket_add(self, row: Row, n: int) -> None:
        if row.state in _QUEUED:
            self.counts["queued"] += n
        elif row.state in _RUNNING:
            self.counts["running"] += n

    def _deliver(self, delivery: Delivery) -> None:
        self.delivered[delivery.status] += 1
        if delivery.reused:
            self.delivered["reused"] += 1
        if self._order == "completed":
            self._tx.send_nowait(delivery)
        else:
            self._ready[delivery.position] = delivery
            while self._next in self._ready:
                self._tx.send_nowait(self._ready.pop(self._next))
                self._next += 1
        self._on_deliver()


def _from_record(position: int, record: Any, rec: RowRecord) -> Delivery:
    output = None if rec.output is None else _DECODER.decode(rec.output)
    return Delivery(
        position,
        record,
        rec.status,
        output=output,
        basis=rec.basis,
        error=rec.error,
        run_id=rec.run_id,
        reused=True,
    )


def _settled(position: int, record: Any, row: Row, *, reused: bool) -> Delivery:
    return Delivery(
        position,
        record,
        row.outcome or "running",
        output=row.output,
        basis=row.basis,
        error=row.error,
        run_id=row.run_id,
        reused=reused,
    )


def _unsettled(position: int, record: Any, row: Row) -> Delivery:
    status = "pending" if row.state in _UNSENT else "running"
    return Delivery(position, record, status, run_id=row.run_id)

"""What an enrichment hands out: `EnrichedRow`, `EnrichProgress` and `EnrichSummary`.

`enriched_row` builds the row of one of the job's deliveries: the input's columns, then the
output fields (as the `OutputSpec` reads them), then ``_status``, ``_error`` and ``_run_id``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from ._enrich_book import Delivery
from ._fields import OutputSpec
from ._models import FieldBasis

__all__ = ["EnrichProgress", "EnrichSummary", "EnrichedRow", "enriched_row"]

_BASIS_DECODER = msgspec.json.Decoder(list[FieldBasis])


class EnrichProgress(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of an enrichment, for a progress bar (rows, not requests).

    Attributes:
        total: input rows (``None`` while a lazy input is still being read).
        read: input rows read so far.
        queued: rows waiting for their run to be created.
        running: rows whose run exists and has not finished.
        completed: rows handed out with their fields.
        failed: rows handed out as failed.
        reused: rows of ``completed``/``failed`` answered from the journal (no new run).
        created: runs created by this invocation.
        elapsed: seconds since the start.
    """

    total: int | None
    read: int
    queued: int
    running: int
    completed: int
    failed: int
    reused: int
    created: int
    elapsed: float

    @property
    def done(self) -> int:
        """Rows handed out with an outcome."""
        return self.completed + self.failed

    @property
    def rate(self) -> float:
        """Rows finished per second by runs of this invocation (journal answers excluded)."""
        fresh = self.done - self.reused
        return fresh / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Estimated seconds left at the current rate (``None`` when unknown)."""
        if self.total is None or self.rate <= 0:
            return None
        return max(0, self.total - self.done) / self.rate


class EnrichSummary(msgspec.Struct, frozen=True, kw_only=True):
    """How an enrichment ended (`Enrichment.summary`).

    Attributes:
        rows: input rows handed out.
        completed: rows with their fields.
        failed: rows whose run failed, or that could not be sent (bad input).
        running: rows whose run was still running at the deadline (picked up next time).
        pending: rows never sent because the deadline came first.
        reused: rows answered from the journal, without a new run.
        created: runs created by this invocation.
        group_id: the task group holding the job's runs (``None`` if none was needed).
        journal: the journal file (``None`` without one).
        fingerprint: the job's `job_fingerprint`.
        elapsed: seconds the job took.
    """

    rows: int
    completed: int
    failed: int
    running: int
    pending: int
    reused: int
    created: int
    group_id: str | None
    journal: str | None
    fingerprint: str
    elapsed: float

    @property
    def finished(self) -> bool:
        """Every row has an outcome (none left running or pending)."""
        return self.running == 0 and self.pending == 0


class EnrichedRow(dict[str, Any]):
    """One enriched row: the input's columns unchanged and in order, then the output fields,
    then ``_status`` (``completed``, ``failed``, ``running`` or ``pending``), ``_error`` and
    ``_run_id``. A plain ``dict`` to every writer; also:

    Attributes:
        position: the row's 0-based position in the input.
    """

    __slots__ = ("_basis", "position")

    def __init__(self, data: Any, position: int, basis: str | None) -> None:
        super().__init__(data)
        self.position = position
        self._basis = basis

    @property
    def status(self) -> str:
        """``completed``, ``failed``, ``running`` or ``pending``."""
        return str(self["_status"])

    @property
    def basis(self) -> dict[str, FieldBasis]:
        """Per output field, why the run answered it: reasoning, citations, confidence."""
        if not self._basis:
            return {}
        return {b.field: b for b in _BASIS_DECODER.decode(self._basis)}

    def __reduce__(self) -> Any:
        return (EnrichedRow, (dict(self), self.position, self._basis))


def enriched_row(delivery: Delivery, spec: OutputSpec) -> EnrichedRow:
    record = delivery.record
    data = dict(record) if isinstance(record, Mapping) else {}
    content = delivery.output if isinstance(delivery.output, Mapping) else None
    values, problems = spec.values(content)
    data.update(values)
    errors = [delivery.error] if delivery.error else []
    data["_status"] = delivery.status
    data["_error"] = "; ".join(errors + problems) or None
    data["_run_id"] = delivery.run_id
    return EnrichedRow(data, delivery.position, delivery.basis)

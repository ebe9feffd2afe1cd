"""Arrow record batches through one partition's enrichment (Spark's unit of data).

`enrich_batches` is the body of a ``mapInArrow`` task: input batches in, the same batches with
the output columns out, in the same order. The enrichment runs on an event loop in a thread of
its own (a blocking portal), reading the input batches as it needs them (at most its
``window`` rows ahead), while the engine's thread writes out each batch once all its rows are
answered: memory stays bounded by the window, whatever the partition's size.
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any

import anyio
import anyio.from_thread
import msgspec

from ._cluster import ClusterPlan, partition_job
from ._cluster_limit import CoordinatorLink
from ._fields import RESERVED_COLUMNS, OutputField, OutputSpec, output_spec

__all__ = ["arrow_type", "enrich_batches", "output_batch"]

_END = object()
_QUEUED = 2  # finished batches waiting for the engine's thread


def _pa() -> Any:
    import pyarrow as pa

    return pa


def arrow_type(field: OutputField) -> Any:
    """The Arrow type of an output column (``json`` fields are JSON text)."""
    pa = _pa()
    scalars = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
    item = field.item_type
    if item is not None:
        return pa.list_(pa.field("element", scalars[item]))  # Spark's name for list items
    return scalars.get(field.type, pa.string())


def output_batch(batch: Any, rows: list[dict[str, Any]], spec: OutputSpec) -> Any:
    """``batch`` with the output columns of its ``rows`` (enriched rows, in order) added."""
    pa = _pa()
    arrays = list(batch.columns)
    fields = list(batch.schema)
    for field in spec.fields:
        values = [row.get(field.name) for row in rows]
        if field.type == "json":
            values = [None if v is None else msgspec.json.encode(v).decode() for v in values]
        kind = arrow_type(field)
        arrays.append(pa.array(values, type=kind))
        fields.append(pa.field(field.name, kind))
    for name in RESERVED_COLUMNS:
        arrays.append(pa.array([row.get(name) for row in rows], type=pa.string()))
        fields.append(pa.field(name, pa.string()))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _next_rows(batches: Iterator[Any]) -> Any:
    """The next batch that has rows, or ``None`` at the end."""
    for batch in batches:
        if batch.num_rows:
            return batch
    return None


class _Pipe:
    """The enrichment of one partition on a portal thread, handing finished batches over."""

    def __init__(
        self,
        plan: ClusterPlan,
        partition: int,
        source: Iterator[Any],
        first: Any,
        open_link: Callable[[], AbstractAsyncContextManager[CoordinatorLink]],
    ) -> None:
        self.plan = plan
        self.partition = partition
        self.source = source
        self.first = first
        self.open_link = open_link
        self.done: queue.Queue[Any] = queue.Queue(maxsize=_QUEUED)
        self.held: deque[Any] = deque()  # input batches read, not yet handed over

    async def put(self, item: Any) -> None:
        await anyio.to_thread.run_sync(self.done.put, item, abandon_on_cancel=True)

    async def rows(self) -> AsyncIterator[dict[str, Any]]:
        batch = self.first
        while batch is not None:
            self.held.append(batch)
            for row in batch.to_pylist():
                yield row
            batch = await anyio.to_thread.run_sync(_next_rows, self.source, abandon_on_cancel=True)

    async def enrich(self) -> None:
        held = self.held
        async with (
            self.open_link() as link,
            partition_job(self.plan, self.partition, link) as start,
            start(self.rows()) as rows,
        ):
            answered: list[dict[str, Any]] = []
            async for row in rows:
                answered.append(row)
                while held and len(answered) >= held[0].num_rows:
                    batch = held.popleft()
                    await self.put((batch, answered[: batch.num_rows]))
                    answered = answered[batch.num_rows :]

    async def main(self) -> None:
        try:
            await self.enrich()
            item: Any = _END
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # handed to the engine's thread, which raises it
            item = exc
        await self.put(item)

    def drain(self, future: Future[None]) -> None:
        """Unblock the enrichment's pending hand-over until it has stopped."""
        while not future.done():
            with suppress(queue.Empty):
                self.done.get(timeout=0.05)


def enrich_batches(
    plan: ClusterPlan,
    partition: int,
    batches: Iterator[Any],
    open_link: Callable[[], AbstractAsyncContextManager[CoordinatorLink]],
) -> Iterator[Any]:
    """Enrich one partition's Arrow batches; yields each with its output columns added."""
    source = iter(batches)
    first = _next_rows(source)
    if first is None:
        return  # an empty partition: nothing to ask, no coordinator call
    spec = output_spec(plan.schema)
    pipe = _Pipe(plan, partition, source, first, open_link)
    with anyio.from_thread.start_blocking_portal() as portal:
        future = portal.start_task_soon(pipe.main)
        try:
            while True:
                item = pipe.done.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                batch, rows = item
                yield output_batch(batch, rows, spec)
        finally:
            if not future.done():  # the engine stopped reading: stop the enrichment
                future.cancel()
                pipe.drain(future)

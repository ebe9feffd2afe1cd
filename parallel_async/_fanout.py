"""The poll strategy: create runs one by one and await them by rotation over ``/result``.

Runs waiting for a slot sit in the ledger's FIFO; a poll that answers 408 ("still running")
sends its run to the back, so an unfinished run never holds a slot while finished ones wait
(rotation). While runs are queued, polls are short (``poll_interval`` seconds); when every run
has a slot of its own, polls are long and cost nothing but an open connection. The engine
(`_engine`) and the ledger (`_ledger`) do the bookkeeping; this module feeds them.

Every run ends in exactly one `Outcome`; one run's failure never aborts the others unless
``fail_fast=True``. What escapes the ``async with`` block: the consumer's own exceptions and, with
``fail_fast``, the first run error, each raised as itself (never wrapped in an ExceptionGroup).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import msgspec
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._defaults import CREATE_WORKERS
from ._engine import Engine, FanoutOptions, aiter_any
from ._errors import CreateTimeoutError, InvalidArgumentError, LedgerError, ParallelError
from ._models import Metadata, RunInput
from ._outcomes import Outcome, Outcomes, serve
from ._protocol import (
    build_run_input,
    check_metadata,
    check_spec_and_input,
    coerce_input,
    spec_chars,
    validate_id,
)
from ._schema import output_type_of

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["FanoutOptions", "as_completed", "gather", "map_inputs"]

InputT = TypeVar("InputT")


class PollEngine(Engine):
    """The engine fed by creates one by one (``map``) or by run ids (``as_completed``)."""

    async def inputs(self, inputs: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
        """The caller's inputs; if reading them fails, stop there and keep the error.

        The runs already created still get their outcomes; the error is raised after them.
        """
        try:
            async for item in aiter_any(inputs):
                yield item
        except Exception as exc:
            self.channel.source_error = exc

    def feed_run_ids(self, run_ids: Sequence[str]) -> None:
        self.outstanding = len(run_ids)
        self.progress.created = len(run_ids)
        for index, run_id in enumerate(run_ids):
            self.ledger.track(index, run_id, None, self.run_deadline(), follow=False)
        self.producing_done()
        self.wake_workers()

    async def produce(
        self,
        inputs: Iterable[Any] | AsyncIterable[Any],
        plan: MapPlan,
        create_send: MemoryObjectSendStream[tuple[int, Any, RunInput]],
    ) -> None:
        index = 0
        async with create_send:
            async for item in self.inputs(inputs):
                self.outstanding += 1
                body, bad = body_or_error(plan, item)
                if bad is not None:
                    await self.fail_input(index, item, bad)
                else:
                    await create_send.send((index, item, body))
                index += 1
        if self.progress.total is None:
            self.progress.total = index

    async def create_worker(
        self, create_recv: MemoryObjectReceiveStream[tuple[int, Any, RunInput]]
    ) -> None:
        create = self._client.task_run._create
        progress = self.progress
        ledger = self.ledger
        deadline = self.deadline
        async with create_recv as recv:
            async for index, item, body in recv:
                entry = ledger.creating(index, item)
                error: ParallelError | None = None
                try:
                    with anyio.fail_after(deadline.remaining()):
                        created = await create(body, self._betas, deadline.as_float(), self._slot)
                except ParallelError as exc:
                    error = exc
                except TimeoutError:
                    error = CreateTimeoutError(timeout=deadline.timeout)
                if error is not None:
                    await self.act(ledger.create_failed(entry, error))
                    continue
                # a run's own deadline starts once it exists
                ledger.created(
                    entry, created.run_id, created.status, self.run_deadline(), follow=False
                )
                self.wake_workers()
                progress.created += 1
                progress.notify()


class MapPlan:
    """``map``'s shared arguments, checked once before any request, and each input's body."""

    __slots__ = ("_meta", "_spec_size", "output_type", "template", "total")

    def __init__(
        self,
        template: RunInput,
        total: int | None,
        output_type: Any,
        metadata: Callable[[Any], Metadata] | None,
    ) -> None:
        self.template = template
        self.total = total
        self.output_type = output_type
        self._meta = metadata
        self._spec_size = spec_chars(template.task_spec)

    def body(self, item: Any) -> RunInput:
        """The create body for one input (`InvalidArgumentError` for a bad one)."""
        if isinstance(item, RunInput):
            return item
        try:
            value = coerce_input(item)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"each input (or a RunInput): {exc}") from None
        check_spec_and_input(self._spec_size, value)
        body = dict(value) if isinstance(value, Mapping) else value
        if self._meta is None:
            return msgspec.structs.replace(self.template, input=body)
        try:
            own = check_metadata(self._meta(item))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"metadata for this input: {exc}") from None
        except Exception as exc:  # the caller's function failed on this input: its outcome
            raise InvalidArgumentError(f"metadata function failed on this input: {exc!r}") from exc
        merged = {**(self.template.metadata or {}), **(own or {})}
        return msgspec.structs.replace(self.template, input=body, metadata=merged or None)


@asynccontextmanager
async def as_completed(
    client: AsyncParallel, run_ids: Iterable[str], options: FanoutOptions
) -> AsyncIterator[Outcomes[None]]:
    """Await existing runs; implementation of `AsyncParallel.as_completed`."""
    ids = check_run_ids(run_ids)
    engine = PollEngine(client, options, total=len(ids))

    def start(tg: TaskGroup) -> None:
        tg.start_soon(engine.end_on_close)
        engine.feed_run_ids(ids)
        for _ in range(min(client.max_in_flight, max(1, len(ids)))):
            tg.start_soon(engine.poll_worker)
        if not engine.deadline.is_never or options.run_timeout is not None:
            tg.start_soon(engine.sweep_deadlines)

    async with serve(engine.channel, start, engine.close) as outcomes:
        yield outcomes


def check_run_ids(run_ids: Iterable[str]) -> list[str]:
    """The run ids as a list, each checked before any request."""
    if isinstance(run_ids, str):
        raise InvalidArgumentError("run_ids must be a list of run ids, not one string")
    return [validate_id(run_id) for run_id in run_ids]


def body_or_error(plan: MapPlan, item: Any) -> tuple[Any, InvalidArgumentError | None]:
    """An input's body, or the error that makes it an outcome (reported outside the except
    block, so a cancellation meanwhile carries no error as its context)."""
    try:
        return plan.body(item), None
    except InvalidArgumentError as exc:
        return None, exc


def map_setup(inputs: Iterable[Any] | AsyncIterable[Any], create_kwargs: dict[str, Any]) -> MapPlan:
    """Check ``map``'s shared arguments once, before any request."""
    if isinstance(inputs, str | bytes | Mapping):
        raise InvalidArgumentError("inputs must be an iterable of inputs, not a single input")
    if not isinstance(inputs, Iterable | AsyncIterable):
        raise InvalidArgumentError(
            f"inputs must be an iterable or async iterable of inputs, got {type(inputs).__name__}"
        )
    kwargs = dict(create_kwargs)
    metadata = kwargs.get("metadata")
    meta_fn = None
    if callable(metadata):  # one dict per input, merged over nothing
        meta_fn, kwargs["metadata"] = metadata, None
    template = build_run_input(input="-", **kwargs)
    total = len(inputs) if isinstance(inputs, Sequence) else None
    return MapPlan(template, total, output_type_of(kwargs.get("output")), meta_fn)


@asynccontextmanager
async def map_inputs(
    client: AsyncParallel,
    inputs: Iterable[Any] | AsyncIterable[Any],
    create_kwargs: dict[str, Any],
    options: FanoutOptions,
) -> AsyncIterator[Outcomes[Any]]:
    """Create a run per input and await them; ``map`` with the poll strategy."""
    plan = map_setup(inputs, create_kwargs)
    engine = PollEngine(client, options, total=plan.total, output_type=plan.output_type)
    create_send, create_recv = anyio.create_memory_object_stream[tuple[int, Any, RunInput]](0)

    async def create_then_finish() -> None:
        async with anyio.create_task_group() as creators:
            with create_recv:  # each worker owns a clone; the stream ends when all are done
                for _ in range(min(CREATE_WORKERS, client.max_in_flight)):
                    creators.start_soon(engine.create_worker, create_recv.clone())
            creators.start_soon(engine.produce, inputs, plan, create_send)
        engine.producing_done()

    def start(tg: TaskGroup) -> None:
        tg.start_soon(engine.end_on_close)
        tg.start_soon(create_then_finish)
        for _ in range(client.max_in_flight):
            tg.start_soon(engine.poll_worker)
        if not engine.deadline.is_never or options.run_timeout is not None:
            tg.start_soon(engine.sweep_deadlines)

    async with serve(engine.channel, start, engine.close) as outcomes:
        yield outcomes


async def gather(
    client: AsyncParallel, run_ids: Iterable[str], options: FanoutOptions
) -> list[Outcome[None]]:
    """Await existing runs; outcomes in input order. See `AsyncParallel.gather`."""
    ids = check_run_ids(run_ids)
    outcomes: list[Outcome[None] | None] = [None] * len(ids)
    async with as_completed(client, ids, options) as stream:
        async for outcome in stream:
            outcomes[outcome.index] = outcome
    missing = [i for i, o in enumerate(outcomes) if o is None]
    if missing:  # cannot happen: every run ends in one outcome; never shift the order silently
        raise LedgerError(f"runs at positions {missing[:10]} got no outcome")
    return cast(list[Outcome[None]], outcomes)

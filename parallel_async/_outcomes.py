"""Outcomes: how each run ended, the channel that carries them, and what escapes the block.

An engine writes into an `OutcomeChannel` (outcomes, an abort error, the input's error);
`serve` runs the engine's tasks in one task group while the caller iterates `Outcomes` from
that channel, and decides what leaves the ``async with`` block: the consumer's own exception as
itself, else the abort error (``fail_fast``'s first run error, or the progress callback's
exception), else the input iterable's error. Never an ExceptionGroup of ours.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Generic, Literal, TypeAlias, TypeVar, Union

import anyio
import msgspec
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream
from typing_extensions import TypeVar as DefaultTypeVar

from ._errors import LedgerError, ParallelError
from ._models import TaskRunResult

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Completed", "Failed", "Outcome", "OutcomeChannel", "Outcomes", "serve"]

InputT = TypeVar("InputT")
OutputT = DefaultTypeVar("OutputT", default=None)


class Completed(msgspec.Struct, Generic[InputT, OutputT], frozen=True, kw_only=True):
    """A run that completed with a result (``ok`` is ``True``).

    Attributes:
        run_id: the run.
        index: position of the run id (``as_completed``) or input (``map``) in what you passed.
        result: the decoded result.
        input: the input (``map`` only).
        parsed: with ``map(..., output=T)``, the ``ParsedTaskRunResult[T]`` (the typed value is
            ``parsed.output.parsed``); otherwise ``None``.
        error: always ``None`` (for code that checks ``o.error is None``).
    """

    ok: ClassVar[Literal[True]] = True
    run_id: str
    index: int
    result: TaskRunResult
    input: InputT | None = None
    parsed: OutputT
    error: None = None


class Failed(msgspec.Struct, Generic[InputT], frozen=True, kw_only=True):
    """A run (or an input) that ended without a result (``ok`` is ``False``).

    Attributes:
        run_id: the run (``None`` when ``map`` could not create it).
        index: position of the run id or input in what you passed.
        error: our typed error (`RunFailedError`, `RunTimeoutError`, `CreateTimeoutError`,
            `OutputValidationError` with the untyped result on it, ...).
        input: the input (``map`` only).
        result: always ``None``.
        parsed: always ``None``.
    """

    ok: ClassVar[Literal[False]] = False
    run_id: str | None
    index: int
    error: ParallelError
    input: InputT | None = None
    result: None = None
    parsed: None = None


Outcome: TypeAlias = Union[Completed[InputT, OutputT], Failed[InputT]]  # noqa: UP007
"""How one run ended: `Completed` or `Failed`, never both. ``if o.ok:`` narrows it for a type
checker (``o.result`` is then a ``TaskRunResult``, ``o.parsed`` the typed result)."""


class OutcomeChannel:
    """Where an engine puts outcomes, and what it wants raised out of the block.

    The engine sends outcomes (waiting when the consumer is ``buffer`` behind), may `abort`
    with an error, and records the input iterable's error; `serve` and `Outcomes` read only
    this, never the engine.
    """

    __slots__ = (
        "_receive",
        "_scope",
        "_send",
        "abort_error",
        "fail_fast",
        "group_id",
        "in_order",
        "source_error",
    )

    def __init__(self, buffer: int, *, fail_fast: bool, in_order: bool = False) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[Outcome[Any, Any]](buffer)
        self.fail_fast = fail_fast
        self.in_order = in_order
        self.group_id: str | None = None  # the task group the runs were created in
        self.abort_error: BaseException | None = None
        self.source_error: Exception | None = None
        self._scope: anyio.CancelScope | None = None

    async def send(self, outcome: Outcome[Any, Any]) -> None:
        """Deliver one outcome; waits while the consumer is a whole buffer behind."""
        try:
            self._send.send_nowait(outcome)
        except anyio.WouldBlock:
            pass  # awaited outside the except block: no WouldBlock in cancellation tracebacks
        else:
            return
        await self._send.send(outcome)

    def finish(self) -> None:
        """Every outcome is out: the consumer's iteration ends."""
        self._send.close()

    def abort(self, error: BaseException) -> None:
        """End the fan-out now; ``error`` (the first given) escapes the block as itself."""
        if self.abort_error is None:
            self.abort_error = error
        if self._scope is not None:
            self._scope.cancel()

    def take_source_error(self) -> Exception | None:
        """The input iterable's error, once (raised after the last outcome)."""
        error, self.source_error = self.source_error, None
        return error


class Outcomes(Generic[InputT, OutputT]):
    """The async iterator of outcomes yielded by ``async with``: in completion order, or in
    input order with ``map(..., order="input")``."""

    __slots__ = ("_channel", "_held", "_next", "_receive")

    def __init__(self, channel: OutcomeChannel) -> None:
        self._channel = channel
        self._receive: MemoryObjectReceiveStream[Outcome[InputT, OutputT]] = channel._receive
        self._held: dict[int, Outcome[InputT, OutputT]] | None = {} if channel.in_order else None
        self._next = 0

    @property
    def group_id(self) -> str | None:
        """The task group ``map`` created its runs in (``None`` with the poll strategy, or
        before the first batch was added)."""
        return self._channel.group_id

    def __aiter__(self) -> Outcomes[InputT, OutputT]:
        return self

    async def __anext__(self) -> Outcome[InputT, OutputT]:
        held = self._held
        if held is None:
            return self._check(await self._receive_one())
        # Input order: finished outcomes wait here until every earlier one has arrived.
        while self._next not in held:
            outcome = self._check(await self._receive_one())
            held[outcome.index] = outcome
        self._next += 1
        return held.pop(self._next - 1)

    async def _receive_one(self) -> Outcome[InputT, OutputT]:
        try:
            outcome = self._receive.receive_nowait()
        except anyio.WouldBlock:
            outcome = None  # awaited below, outside the except block
        except anyio.EndOfStream:
            return self._end()
        if outcome is None:
            try:
                outcome = await self._receive.receive()
            except anyio.EndOfStream:
                return self._end()
        return outcome

    def _check(self, outcome: Outcome[InputT, OutputT]) -> Outcome[InputT, OutputT]:
        if self._channel.fail_fast and outcome.error is not None:
            raise outcome.error
        return outcome

    def _end(self) -> Outcome[InputT, OutputT]:
        if self._held:  # cannot happen: every input has one outcome; never skip one silently
            raise LedgerError(f"no outcome for input {self._next}; held {sorted(self._held)[:10]}")
        error = self._channel.take_source_error()
        if error is not None:  # every created run has its outcome: now the input's error
            raise error from None
        raise StopAsyncIteration


def _primary(
    group: BaseExceptionGroup[BaseException], consumer: BaseException | None
) -> BaseException:
    """What escapes instead of a task group's ExceptionGroup: never a wrapper of ours.

    The consumer's own exception wins, exactly as raised (even an ExceptionGroup of its own);
    otherwise the first exception of the engine's tasks (which catch everything they expect).
    """
    if consumer is not None and any(exc is consumer for exc in group.exceptions):
        return consumer
    cancelled = anyio.get_cancelled_exc_class()
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        inner = [e for e in first.exceptions if not isinstance(e, cancelled)] or list(
            first.exceptions
        )
        first = inner[0]
    return first


@asynccontextmanager
async def serve(
    channel: OutcomeChannel, start: Callable[[TaskGroup], None], close: Callable[[], None]
) -> AsyncIterator[Outcomes[Any, Any]]:
    """Run an engine's tasks (``start`` spawns them) while the caller iterates outcomes.

    ``close`` runs once every task is gone. What escapes: the consumer's exception as itself;
    else the channel's abort error (the first run error with ``fail_fast``, or the progress
    callback's exception); else the input iterable's error if the consumer did not meet it
    while iterating. Never an ExceptionGroup of ours.
    """
    send, receive = channel._send, channel._receive
    consumer: BaseException | None = None
    try:
        async with send, receive, anyio.create_task_group() as tg:
            channel._scope = tg.cancel_scope
            start(tg)
            try:
                yield Outcomes(channel)
            except BaseException as exc:
                consumer = exc
                raise
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        error = _primary(group, consumer)
        raise error from error.__cause__
    finally:
        close()  # only once every task is gone
    if channel.abort_error is not None and (
        consumer is None or isinstance(consumer, anyio.get_cancelled_exc_class())
    ):
        error = channel.abort_error
        raise error from error.__cause__
    source_error = channel.take_source_error()
    if source_error is not None:
        raise source_error

"""Outcomes: how each run ended, the iterator that yields them, and what escapes the block.

`serve` runs a fan-out engine's tasks in one task group while the caller iterates its
`Outcomes`, and decides what leaves the ``async with`` block: the consumer's own exception as
itself, else the engine's abort error (``fail_fast``'s first run error, or the progress
callback's exception), else the input iterable's error. Never an ExceptionGroup of ours.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import msgspec
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from ._errors import ParallelError
from ._models import TaskRunResult

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from ._fanout import _Engine

__all__ = ["Outcome", "Outcomes", "serve"]

InputT = TypeVar("InputT")


class Outcome(msgspec.Struct, Generic[InputT], frozen=True, kw_only=True):
    """How one run ended: a result or an error, never both.

    Attributes:
        run_id: the run (``None`` when ``map`` could not create it).
        result: the decoded result when the run completed.
        error: our typed error otherwise (`RunFailedError`, `RunTimeoutError`, ...).
        index: position of the run id (``as_completed``) or input (``map``) in what you passed.
        input: the input (``map`` only).
        parsed: the ``ParsedTaskRunResult`` of a completed run when ``map`` was given an
            ``output`` type (the typed value is ``parsed.output.parsed``); content that does
            not fit becomes an ``OutputValidationError`` outcome, the untyped result still on
            the error.
    """

    run_id: str | None
    index: int
    result: TaskRunResult | None = None
    error: ParallelError | None = None
    input: InputT | None = None
    parsed: Any = None

    @property
    def ok(self) -> bool:
        """True when the run completed with a result."""
        return self.error is None


class Outcomes(Generic[InputT]):
    """The async iterator of outcomes, in completion order, yielded by ``async with``."""

    __slots__ = ("_engine", "_fail_fast", "_receive")

    def __init__(
        self, receive: MemoryObjectReceiveStream[Outcome[InputT]], engine: _Engine
    ) -> None:
        self._receive = receive
        self._engine = engine
        self._fail_fast = engine._options.fail_fast

    def __aiter__(self) -> Outcomes[InputT]:
        return self

    async def __anext__(self) -> Outcome[InputT]:
        try:
            try:
                outcome = self._receive.receive_nowait()
            except anyio.WouldBlock:
                outcome = await self._receive.receive()
        except anyio.EndOfStream:
            error = self._engine.take_source_error()
            if error is not None:  # every created run has its outcome: now the input's error
                raise error from None
            raise StopAsyncIteration from None
        if self._fail_fast and outcome.error is not None:
            raise outcome.error
        return outcome


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
    engine: _Engine, start: Callable[[TaskGroup], None]
) -> AsyncIterator[Outcomes[Any]]:
    """Run ``engine``'s tasks (``start`` spawns them) while the caller iterates outcomes.

    What escapes: the consumer's exception as itself; else the engine's abort error (the
    first run error with ``fail_fast``, or the progress callback's exception); else the input
    iterable's error if the consumer did not meet it while iterating. Never an ExceptionGroup
    of ours.
    """
    send, receive = engine._out, engine._receive
    consumer: BaseException | None = None
    try:
        async with send, receive, anyio.create_task_group() as tg:
            engine._scope = tg.cancel_scope
            start(tg)
            try:
                yield Outcomes(receive, engine)
            except BaseException as exc:
                consumer = exc
                raise
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        error = _primary(group, consumer)
        raise error from error.__cause__
    finally:
        engine.close()  # only once every task is gone
    if engine._abort_error is not None and (
        consumer is None or isinstance(consumer, anyio.get_cancelled_exc_class())
    ):
        error = engine._abort_error
        raise error from error.__cause__
    source_error = engine.take_source_error()
    if source_error is not None:
        raise source_error

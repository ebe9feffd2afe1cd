"""The fan-out engine: create and await thousands of runs, at most ``max_in_flight`` at a time.

Shape: a fixed pool of poll workers (as many as the client's ``max_in_flight``) and a small pool
of create workers share one client-wide capacity limiter, so memory for tasks stays
O(max_in_flight) while the bookkeeping for N runs is one small record each. Runs waiting for a
slot sit in a FIFO queue; a poll that answers 408 ("still running") sends its run to the back of
the queue, so an unfinished run never holds a slot while finished ones wait (rotation). While
runs are queued, polls are short (``poll_interval`` seconds); when every run has a slot of its
own, polls are long and cost nothing but an open connection.

Every run ends in exactly one `Outcome`; one run's failure never aborts the others unless
``fail_fast=True``. What escapes the ``async with`` block: the consumer's own exceptions and, with
``fail_fast``, the first run error, each raised as itself (never wrapped in an ExceptionGroup).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import msgspec
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import InvalidArgumentError, ParallelError, RunTimeoutError
from ._models import RUN_STATUSES, RunInput, TaskRunResult
from ._outcomes import Outcome, Outcomes, serve
from ._progress import ProgressCallback, ProgressTracker
from ._protocol import (
    build_run_input,
    check_spec_and_input,
    coerce_input,
    spec_chars,
    validate_id,
)
from ._retry import transient_failure
from ._schema import output_type_of
from ._task_run import LONG_POLL_READ_MARGIN, early_408_delay
from ._typed import OutputValidationError, parse_output

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["FanoutOptions", "as_completed", "gather", "map_inputs"]

InputT = TypeVar("InputT")

DEFAULT_POLL_INTERVAL = 1
DEFAULT_LONG_POLL = 30
CREATE_WORKERS = 16
TRANSIENT_ROUNDS = 3
"""Times a run goes back in the queue after a poll failed for good on a transient error."""


class _RunQueue:
    """FIFO of runs waiting for a poll, shared by the workers.

    A deque and one future per idle worker: unlike an anyio memory stream, taking an item that
    is there costs no checkpoint, which matters at one queue operation per request.
    """

    __slots__ = ("_closed", "_items", "_waiters")

    def __init__(self) -> None:
        self._items: deque[_Run] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, run: _Run) -> None:
        """Queue ``run`` (ignored once the fan-out is over) and wake one idle worker."""
        if not self._closed:
            self._items.append(run)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """End the queue: idle and future ``get`` calls return ``None``."""
        self._closed = True
        self._items.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> _Run | None:
        """The next run, waiting for one; ``None`` once the queue is closed."""
        while not self._items:
            if self._closed:
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # we were woken but are leaving: pass it on
                raise
        return self._items.popleft()


class _Run:
    """One run's bookkeeping while it is tracked."""

    __slots__ = (
        "asked",
        "deadline",
        "done",
        "early",
        "failures",
        "index",
        "input",
        "run_id",
        "status",
    )

    def __init__(self, index: int, run_id: str | None, input: Any, deadline: float) -> None:
        self.index = index
        self.run_id = run_id
        self.input = input
        self.deadline = deadline
        self.status: str | None = None
        self.done = False
        self.failures = 0  # polls that failed after their retries, for this run
        self.asked = 0  # the long-poll of its last request, seconds
        self.early = 0  # 408s in a row that came long before the wait asked for


class _Slots:
    """The client-wide fan-out slots, counted in this fan-out's progress.

    Passed down to the request path, which holds a slot only while a request is open: never
    while waiting for the create limiter or between retries.
    """

    __slots__ = ("_limiter", "_progress")

    def __init__(self, limiter: anyio.CapacityLimiter, progress: ProgressTracker) -> None:
        self._limiter = limiter
        self._progress = progress

    async def acquire(self) -> None:
        try:
            self._limiter.acquire_nowait()
        except anyio.WouldBlock:
            await self._limiter.acquire()
        self._progress.in_flight += 1

    def release(self) -> None:
        self._progress.in_flight -= 1
        self._limiter.release()


class FanoutOptions(msgspec.Struct, frozen=True, kw_only=True):
    """The arguments every fan-out shares; see `AsyncParallel.as_completed`."""

    timeout: float | None = None
    run_timeout: float | None = None
    poll_interval: int = DEFAULT_POLL_INTERVAL
    fail_fast: bool = False
    progress: ProgressCallback | None = None
    betas: Sequence[str] | None = None

    def check(self) -> None:
        """Refuse bad values before any request."""
        _check_timeout("timeout", self.timeout)
        _check_timeout("run_timeout", self.run_timeout)
        p = self.poll_interval
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise InvalidArgumentError("poll_interval must be a whole number of seconds >= 1")


def outcome_buffer(client: AsyncParallel) -> int:
    """Outcomes held for a consumer that is behind, before the engine waits for it."""
    return max(1024, 4 * client.max_in_flight)


def _check_timeout(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not value > 0):
        raise InvalidArgumentError(f"{name} must be a positive number of seconds or None")


class _Engine:
    """Runs one fan-out; see the module docstring."""

    def __init__(
        self,
        client: AsyncParallel,
        options: FanoutOptions,
        *,
        total: int | None,
        output_type: Any = None,
    ) -> None:
        options.check()
        client._open()
        self._client = client
        self._options = options
        self._output_type = output_type
        self._out, self._receive = anyio.create_memory_object_stream[Outcome[Any]](
            outcome_buffer(client)
        )
        self._run_timeout = options.run_timeout
        self._timeout = options.timeout
        self._deadline = math.inf if options.timeout is None else time.monotonic() + options.timeout
        self._poll_interval = options.poll_interval
        self._betas = options.betas
        self._progress = ProgressTracker(options.progress, total, on_error=self.abort)
        self._slot = _Slots(client._fanout_slots(), self._progress)
        self._queue = _RunQueue()
        self._outstanding = 0
        self._producing = True
        self._scope: anyio.CancelScope | None = None  # the task group's, set by `serve`
        self._abort_error: BaseException | None = None
        self._source_error: Exception | None = None

    def abort(self, error: BaseException) -> None:
        """End the fan-out now; ``error`` escapes the ``async with`` block as itself."""
        if self._abort_error is None:
            self._abort_error = error
        self._producing = False
        self._queue.close()
        if self._scope is not None:
            self._scope.cancel()

    def take_source_error(self) -> Exception | None:
        """The input iterable's error, once (raised after the last outcome)."""
        error, self._source_error = self._source_error, None
        return error

    async def _inputs(self, inputs: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
        """The caller's inputs; if reading them fails, stop there and keep the error.

        The runs already created still get their outcomes; the error is raised after them.
        """
        try:
            async for item in _aiter(inputs):
                yield item
        except Exception as exc:
            self._source_error = exc

    def _run_deadline(self) -> float:
        if self._run_timeout is None:
            return self._deadline
        return min(self._deadline, time.monotonic() + self._run_timeout)

    async def _emit(
        self, run: _Run, result: TaskRunResult | None, error: ParallelError | None
    ) -> None:
        if run.done:  # e.g. timed out by the deadline sweep while its result was in flight
            return
        run.done = True
        if error is not None and self._options.fail_fast:
            self.abort(error)
            return
        parsed = None
        if result is not None and self._output_type is not None:
            try:
                parsed = parse_output(result, self._output_type)
            except OutputValidationError as exc:
                result, error = None, exc
        progress = self._progress
        if error is None:
            progress.completed += 1
        elif isinstance(error, RunTimeoutError):
            progress.timed_out += 1
        else:
            progress.failed += 1
        progress.notify()
        outcome = Outcome(
            run_id=run.run_id,
            index=run.index,
            result=result,
            error=error,
            input=run.input,
            parsed=parsed,
        )
        try:
            self._out.send_nowait(outcome)
        except anyio.WouldBlock:  # the consumer is behind: wait for it (backpressure)
            await self._out.send(outcome)
        self._outstanding -= 1
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._outstanding == 0 and not self._producing:
            # every outcome is out: end the workers' queue and the consumer's iteration
            self._queue.close()
            self._out.close()

    def close(self) -> None:
        """Close the work queue (the outcome streams belong to the caller)."""
        self._queue.close()

    def _track(self, run: _Run) -> None:
        self._queue.put(run)

    # --- polling --------------------------------------------------------------------------------

    async def poll_worker(self) -> None:
        """Poll runs from the queue, one request at a time, until the fan-out is over."""
        while (run := await self._queue.get()) is not None:
            if run.done:
                continue
            remaining = run.deadline - time.monotonic()
            if remaining <= 0:
                await self._timed_out(run)
                continue
            started = time.monotonic()
            result, error = await self._poll_once(run, remaining)
            if error is not None and transient_failure(error) and run.failures < TRANSIENT_ROUNDS:
                # A healthy run must not end because the server had a bad minute: the retry
                # policy gave up on this poll, so put the run back for a later one.
                run.failures += 1
                error = None
            if result is not None or error is not None:
                await self._emit(run, result, error)
            elif not run.done:
                now = time.monotonic()
                delay = min(
                    early_408_delay(run.asked, now - started, run.early),
                    max(0.0, run.deadline - now),  # back in time to be timed out
                )
                if delay:  # the server answered long before the wait we asked: don't spin
                    run.early += 1
                    asyncio.get_running_loop().call_later(delay, self._queue.put, run)
                else:
                    run.early = 0
                    self._queue.put(run)  # rotate: to the back of the queue

    async def _poll_once(
        self, run: _Run, remaining: float
    ) -> tuple[TaskRunResult | None, ParallelError | None]:
        """One ``/result`` request for ``run`` under a slot; ``(None, None)`` means 408."""
        wait = self._wait()
        if remaining != math.inf:
            wait = max(1, min(wait, int(remaining)))
        run.asked = wait
        result: TaskRunResult | None = None
        try:
            # A cancel scope only where the deadline can cut this poll short.
            near = remaining < wait + LONG_POLL_READ_MARGIN + 1
            with anyio.move_on_after(remaining) if near else contextlib.nullcontext():
                result, status = await self._client.task_run._poll(
                    cast(str, run.run_id),
                    wait,
                    self._betas,
                    None if remaining == math.inf else run.deadline,
                    self._slot,
                )
                if status is not None:
                    run.status = status
        except ParallelError as exc:
            return None, exc
        return result, None  # None when 408, or cut at the deadline (timed out next turn)

    def _wait(self) -> int:
        """The server long-poll for the next request, in whole seconds.

        Chosen so that every run waiting for a slot gets one within about ``poll_interval``:
        with ``B`` more unfinished runs than slots ``S``, each slot hands over every
        ``poll_interval * S / B`` seconds. So a small backlog gets longer polls (fewer 408s),
        and none (every run has a slot of its own) the longest. While ``map`` is still
        creating, more runs are coming, so polls stay short.
        """
        interval = self._poll_interval
        if self._producing:
            return interval
        slots = self._client.max_in_flight
        backlog = self._outstanding - slots
        if backlog <= 0:
            return DEFAULT_LONG_POLL
        return min(DEFAULT_LONG_POLL, max(interval, interval * slots // backlog))

    async def _timed_out(self, run: _Run) -> None:
        timeout = self._run_timeout if self._run_deadline_is_own(run) else self._timeout
        status = run.status if run.status in RUN_STATUSES else None  # not our own markers
        error = RunTimeoutError(run_id=run.run_id or "", last_status=status, timeout=timeout)
        await self._emit(run, None, error)

    def _run_deadline_is_own(self, run: _Run) -> bool:
        return self._run_timeout is not None and run.deadline < self._deadline

    # --- existing runs --------------------------------------------------------------------------

    def feed_run_ids(self, run_ids: Sequence[str]) -> None:
        self._outstanding = len(run_ids)
        self._progress.created = len(run_ids)
        for index, run_id in enumerate(run_ids):
            self._track(_Run(index, run_id, None, self._run_deadline()))
        self._producing = False
        self._maybe_finish()

    # --- create and await -----------------------------------------------------------------------

    async def produce(
        self,
        inputs: Iterable[Any] | AsyncIterable[Any],
        template: RunInput,
        create_send: MemoryObjectSendStream[tuple[int, Any, RunInput]],
    ) -> None:
        index = 0
        spec_size = spec_chars(template.task_spec)
        async with create_send:
            async for item in self._inputs(inputs):
                self._outstanding += 1
                try:
                    body = _body_for(item, template, spec_size)
                except InvalidArgumentError as exc:
                    await self._emit(_Run(index, None, item, self._deadline), None, exc)
                else:
                    await create_send.send((index, item, body))
                index += 1
        if self._progress.total is None:
            self._progress.total = index

    async def create_worker(
        self, create_recv: MemoryObjectReceiveStream[tuple[int, Any, RunInput]]
    ) -> None:
        create = self._client.task_run._create
        progress = self._progress
        async with create_recv as recv:
            async for index, item, body in recv:
                run = _Run(index, None, item, self._deadline)
                try:
                    with anyio.fail_after(max(0.0, self._deadline - time.monotonic())):
                        created = await create(
                            body,
                            self._betas,
                            None if self._deadline == math.inf else self._deadline,
                            self._slot,
                        )
                except ParallelError as exc:
                    await self._emit(run, None, exc)
                    continue
                except TimeoutError:
                    await self._emit(
                        run,
                        None,
                        RunTimeoutError(run_id="", last_status=None, timeout=self._timeout),
                    )
                    continue
                run.run_id = created.run_id
                run.status = created.status
                run.deadline = self._run_deadline()  # a run's own deadline starts once it exists
                self._track(run)
                progress.created += 1
                progress.notify()

    def producing_done(self) -> None:
        self._producing = False
        self._maybe_finish()


def _body_for(item: Any, template: RunInput, spec_size: int) -> RunInput:
    """The create body for one input of ``map`` (``spec_size``: the template's spec chars)."""
    if isinstance(item, RunInput):
        return item
    try:
        value = coerce_input(item)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"each input (or a RunInput): {exc}") from None
    check_spec_and_input(spec_size, value)
    return msgspec.structs.replace(
        template, input=dict(value) if isinstance(value, Mapping) else value
    )


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


@asynccontextmanager
async def as_completed(
    client: AsyncParallel, run_ids: Iterable[str], options: FanoutOptions
) -> AsyncIterator[Outcomes[None]]:
    """Await existing runs; implementation of `AsyncParallel.as_completed`."""
    ids = check_run_ids(run_ids)
    engine = _Engine(client, options, total=len(ids))

    def start(tg: TaskGroup) -> None:
        engine.feed_run_ids(ids)
        for _ in range(min(client.max_in_flight, max(1, len(ids)))):
            tg.start_soon(engine.poll_worker)

    async with serve(engine, start) as outcomes:
        yield outcomes


def check_run_ids(run_ids: Iterable[str]) -> list[str]:
    """The run ids as a list, each checked before any request."""
    if isinstance(run_ids, str):
        raise InvalidArgumentError("run_ids must be a list of run ids, not one string")
    return [validate_id(run_id) for run_id in run_ids]


def map_setup(
    inputs: Iterable[Any] | AsyncIterable[Any], create_kwargs: dict[str, Any]
) -> tuple[RunInput, int | None, Any]:
    """Check ``map``'s shared arguments once, before any request: (template, total, type)."""
    if isinstance(inputs, str | bytes | Mapping):
        raise InvalidArgumentError("inputs must be an iterable of inputs, not a single input")
    if not isinstance(inputs, Iterable | AsyncIterable):
        raise InvalidArgumentError(
            f"inputs must be an iterable or async iterable of inputs, got {type(inputs).__name__}"
        )
    template = build_run_input(input="-", **create_kwargs)
    total = len(inputs) if isinstance(inputs, Sequence) else None
    return template, total, output_type_of(create_kwargs.get("output"))


@asynccontextmanager
async def map_inputs(
    client: AsyncParallel,
    inputs: Iterable[Any] | AsyncIterable[Any],
    create_kwargs: dict[str, Any],
    options: FanoutOptions,
) -> AsyncIterator[Outcomes[Any]]:
    """Create a run per input and await them; ``map`` with the poll strategy."""
    template, total, output_type = map_setup(inputs, create_kwargs)
    engine = _Engine(client, options, total=total, output_type=output_type)
    create_send, create_recv = anyio.create_memory_object_stream[tuple[int, Any, RunInput]](0)

    async def create_then_finish() -> None:
        async with anyio.create_task_group() as creators:
            with create_recv:  # each worker owns a clone; the stream ends when all are done
                for _ in range(min(CREATE_WORKERS, client.max_in_flight)):
                    creators.start_soon(engine.create_worker, create_recv.clone())
            creators.start_soon(engine.produce, inputs, template, create_send)
        engine.producing_done()

    def start(tg: TaskGroup) -> None:
        tg.start_soon(create_then_finish)
        for _ in range(client.max_in_flight):
            tg.start_soon(engine.poll_worker)

    async with serve(engine, start) as outcomes:
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
        raise AssertionError(f"runs at positions {missing[:10]} got no outcome")
    return cast(list[Outcome[None]], outcomes)

"""Server-sent event streams over the client, with transparent reconnects.

Two resume models, as the API has them:

* group streams (``/groups/{id}/events`` and ``/groups/{id}/runs``) carry an ``event_id`` cursor:
  after a disconnect we reconnect with ``last_event_id`` so no event is lost or doubled;
* run streams (``/runs/{id}/events``) have no cursor and replay everything on reconnect (and the
  API closes them after about 570 s): we reconnect and drop what we already yielded, until the
  run reaches a terminal state or the caller's deadline.

A stream that ends in the middle of an event (a partial line, or an event cut before its ``data``)
was cut, whatever the TCP close looked like: it is resumed like a dropped connection, never taken
for the server ending the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import msgspec

from . import _defaults as defaults
from ._backoff import backoff
from ._deadline import check_seconds
from ._errors import DisconnectedError, TransportTimeoutError
from ._events import (
    GroupEvent,
    RunEvent,
    TaskGroupStatus,
    TaskGroupStatusEvent,
    TaskRunStateEvent,
    decode_group_event,
    decode_run_event,
)
from ._models import TERMINAL_STATUSES
from ._options import RequestOptions
from ._protocol import error_from_response
from ._replays import Replays
from ._retry import call_with_retry
from ._sse import ServerSentEvent, SSEDecoder
from ._stream_budget import MAX_RECONNECTS, StreamBudget
from ._transport import StreamResponse, open_stream

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = [
    "EventStream",
    "group_event_stream",
    "group_runs_stream",
    "run_event_stream",
    "stream_read_timeout",
]

E = TypeVar("E")

# A stream may sit idle while runs work; this silence only catches a dead connection.
STREAM_READ_TIMEOUT = defaults.STREAM_READ_TIMEOUT  # patched in tests


def stream_read_timeout(timeout: object) -> float:
    """The official SDK's ``timeout`` of a group stream, as the stream's silence limit.

    In the SDK it is the httpx timeout: how long one read may wait for bytes. Here too: a
    connection that brought data and is then silent for that long is taken as dead and
    resumed from the cursor, like any dropped one; one that answered but brings no data for
    that long ends the call (see `StreamBudget`). ``None`` (no timeout in the SDK) keeps our
    default, `STREAM_READ_TIMEOUT`.
    """
    if timeout is None:
        return STREAM_READ_TIMEOUT
    seconds = check_seconds(
        "timeout", timeout, meaning="how long a stream connection may wait for data"
    )
    return STREAM_READ_TIMEOUT if seconds is None else seconds


class EventStream(Generic[E]):
    """An async iterator of typed events; close it (or leave ``async with``) to disconnect.

    ``async for event in stream`` ends when the server ends the stream for good (the run or
    group finished, or the ``api_timeout`` you gave passed), or when the ``timeout`` of
    ``task_run.events`` passes. A stream cut mid-event is resumed, never taken for its end.
    """

    __slots__ = ("_gen",)

    def __init__(self, gen: AsyncIterator[E]) -> None:
        self._gen = gen

    def __aiter__(self) -> EventStream[E]:
        return self

    async def __anext__(self) -> E:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Disconnect (idempotent)."""
        aclose = getattr(self._gen, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> EventStream[E]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _open(
    client: AsyncParallel,
    path: str,
    params: Mapping[str, str],
    betas: Sequence[str] | None,
    budget: StreamBudget,
    *,
    options: RequestOptions | None = None,
) -> AbstractAsyncContextManager[StreamResponse]:
    """Open a stream; the opening request goes through the retry policy like any GET.

    Its attempts count against ``budget``'s failures; its waits end by the caller's deadline.
    ``options`` (the SDK's extras) add their headers and query parameters to this connection;
    the stream's own parameters (the resume cursor) win over extra ones of the same name.
    """

    @asynccontextmanager
    async def opened() -> AsyncIterator[StreamResponse]:
        transport = client._open()
        headers = {**client._headers(betas, json_body=False), "Accept": "text/event-stream"}
        query = params
        if options is not None:
            headers = options.apply_headers(headers)
            query = options.apply_params(params)
        cm: AbstractAsyncContextManager[StreamResponse] | None = None
        policy = client.retry_policy
        left = MAX_RECONNECTS + 1 - budget.failures
        if left < policy.attempts:
            policy = msgspec.structs.replace(policy, attempts=max(1, left))
        made = 0

        async def attempt() -> StreamResponse:
            nonlocal cm, made
            made += 1
            new = open_stream(
                transport, path, headers=headers, params=query, read_timeout=budget.idle
            )
            with client._breaker.attempt(client.retry_policy.circuit_breaker, "GET", path):
                resp = await new.__aenter__()
            if 200 <= resp.status < 300:
                cm = new
                return resp
            try:
                body = await resp.read()
            finally:  # release the connection even if reading the error body fails
                with anyio.CancelScope(shield=True):
                    await new.__aexit__(None, None, None)
            raise error_from_response(resp.status, resp.headers, body)

        try:
            try:
                resp = await call_with_retry(
                    policy,
                    attempt,
                    idempotent=True,
                    deadline=budget.deadline,
                    wake=client._breaker.opened,
                )
            finally:
                budget.failures += max(0, made - 1)  # the attempts that failed
            yield resp
        finally:  # also when cancelled (a deadline) right after the successful attempt
            if cm is not None:
                with anyio.CancelScope(shield=True):
                    await cm.__aexit__(None, None, None)

    return opened()


async def _connect(
    stack: AsyncExitStack,
    client: AsyncParallel,
    path: str,
    params: Mapping[str, str],
    betas: Sequence[str] | None,
    *,
    budget: StreamBudget,
    options: RequestOptions | None = None,
) -> StreamResponse | None:
    """Open a connection on ``stack``; ``None`` if the caller's deadline passes first.

    Closing the client ends the opening (its retries included) with `ClientClosedError`.
    """
    budget.connecting()
    opening = _open(client, path, params, betas, budget, options=options)
    with client._closing.watch(f"GET {path}"):
        if budget.deadline is None:
            return await stack.enter_async_context(opening)
        with anyio.CancelScope(deadline=budget.deadline):
            return await stack.enter_async_context(opening)
    return None


async def _pause(
    client: AsyncParallel, path: str, attempt: int, deadline: float | None = None
) -> None:
    """`_backoff`, ended by closing the client."""
    with client._closing.watch(f"GET {path}"):
        await _backoff(attempt, deadline)


async def _backoff(attempt: int, deadline: float | None = None) -> None:
    """Pause before reconnecting: 0.1 s, doubling, at most 2 s, and never past ``deadline``."""
    delay = backoff(attempt, first=0.05, cap=2.0)
    if deadline is not None:
        delay = max(min(delay, deadline - anyio.current_time()), 0.0)
    await anyio.sleep(delay)


async def _sse_events(
    client: AsyncParallel, resp: StreamResponse, path: str, budget: StreamBudget
) -> AsyncIterator[ServerSentEvent]:
    """The events of one connection.

    Ends early, without error, once the caller's deadline passes, even while only comments
    arrive: each chunk read is then bounded by a cancel scope (one that never spans a
    ``yield``); closing the client ends a read with `ClientClosedError` the same way. A
    stream that ends in the middle of an event raises `DisconnectedError`: it was cut, and
    the caller resumes it like a dropped connection.
    """
    decoder = SSEDecoder(path=path)
    chunks = resp.chunks()
    deadline = budget.deadline
    what = f"GET {path}"
    try:
        while True:
            if deadline is None:
                with client._closing.watch(what):
                    chunk = await anext(chunks, None)
            else:
                if anyio.current_time() >= deadline:
                    return
                chunk = None
                with client._closing.watch(what), anyio.CancelScope(deadline=deadline) as scope:
                    chunk = await anext(chunks, None)
                if scope.cancelled_caught:
                    return
            if chunk is None:
                break
            budget.heard = True
            for event in decoder.feed(chunk):
                yield event
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    for event in decoder.close():
        yield event
    if decoder.truncated:
        raise DisconnectedError(
            f"stream ended in the middle of an event during GET {path}", method="GET", path=path
        )


async def _cursor_stream(
    client: AsyncParallel,
    path: str,
    params: dict[str, str],
    decode: Callable[[str], Any],
    *,
    last_event_id: str | None,
    reconnect_while: Callable[[], bool],
    is_progress: Callable[[Any], bool] = lambda event: True,
    read_timeout: float = STREAM_READ_TIMEOUT,
    options: RequestOptions | None = None,
) -> AsyncIterator[Any]:
    """Yield decoded events, resuming from the last ``event_id`` after any disconnect.

    Only events for which ``is_progress`` is true reset the reconnect budget and backoff: a
    connection that brings nothing new but a replayed status does not make the next one come
    sooner. ``read_timeout`` is the budget's silence; ``options`` apply to every connection.
    """
    budget = StreamBudget(read_timeout)
    cursor = last_event_id
    quiet = 0
    while True:
        query = dict(params)
        if cursor is not None:
            query["last_event_id"] = cursor
        progressed = failed = False
        try:
            async with AsyncExitStack() as stack:
                resp = await _connect(
                    stack, client, path, query, None, budget=budget, options=options
                )
                assert resp is not None  # noqa: S101 - only a caller's deadline gives None
                async for sse in _sse_events(client, resp, path, budget):
                    if not sse.data:
                        continue
                    event = decode(sse.data)
                    event_id = getattr(event, "event_id", None)
                    if event_id:
                        cursor = event_id
                    if is_progress(event):
                        budget.failures = 0
                        progressed = True
                    yield event
            budget.ended_quietly(path)
        except (DisconnectedError, TransportTimeoutError) as exc:
            budget.failed(exc)  # raises when the call cannot go on
            failed = True
        # Pauses happen outside the except block: a cancellation there must not carry the
        # handled error as its context.
        if failed:
            await _pause(client, path, budget.failures)
            continue
        if not reconnect_while():
            return
        quiet = 0 if progressed else quiet + 1
        if quiet:  # closed with nothing new: back off instead of spinning
            await _pause(client, path, quiet)


def group_event_stream(
    client: AsyncParallel,
    task_group_id: str,
    *,
    last_event_id: str | None,
    api_timeout: float | None,
    reconnect: bool = True,
    read_timeout: float = STREAM_READ_TIMEOUT,
    options: RequestOptions | None = None,
) -> EventStream[GroupEvent]:
    """``/groups/{id}/events``: resumed by cursor; reconnects while the group is active.

    With ``reconnect=False`` a clean close by the server ends the iteration (a cut connection
    is still resumed): for a caller that knows better when to come back.
    """
    params: dict[str, str] = {}
    if api_timeout is not None:
        params["timeout"] = f"{api_timeout:g}"
    active = [True]
    last_status: list[TaskGroupStatus | None] = [None]

    def decode(data: str) -> GroupEvent:
        event = decode_group_event(data)
        if isinstance(event, TaskGroupStatusEvent):
            active[0] = event.status.is_active
        return event

    def is_progress(event: GroupEvent) -> bool:
        # A connection may open with the group's current status: unchanged, it is no progress.
        if not isinstance(event, TaskGroupStatusEvent):
            return True
        changed = event.status != last_status[0]
        last_status[0] = event.status
        return changed

    return EventStream(
        _cursor_stream(
            client,
            f"/v1/tasks/groups/{task_group_id}/events",
            params,
            decode,
            last_event_id=last_event_id,
            # A clean close while runs are active is the server's stream lifetime: go on,
            # unless the caller bounded the stream with api_timeout.
            reconnect_while=lambda: reconnect and api_timeout is None and active[0],
            is_progress=is_progress,
            read_timeout=read_timeout,
            options=options,
        )
    )


def group_runs_stream(
    client: AsyncParallel,
    task_group_id: str,
    params: dict[str, str],
    *,
    last_event_id: str | None,
    read_timeout: float = STREAM_READ_TIMEOUT,
    options: RequestOptions | None = None,
) -> EventStream[GroupEvent]:
    """``/groups/{id}/runs``: a snapshot of every run, resumed by cursor after a disconnect."""
    return EventStream(
        _cursor_stream(
            client,
            f"/v1/tasks/groups/{task_group_id}/runs",
            params,
            decode_group_event,
            last_event_id=last_event_id,
            reconnect_while=lambda: False,
            read_timeout=read_timeout,
            options=options,
        )
    )


def run_event_stream(
    client: AsyncParallel,
    run_id: str,
    *,
    timeout: float | None,
    betas: Sequence[str] | None,
    options: RequestOptions | None = None,
) -> EventStream[RunEvent]:
    """``/runs/{id}/events``: reconnects (the API replays) and drops the replayed events.

    With a ``timeout``, the iteration ends (without error) once it passes, even while the
    server sends only keep-alive comments or replays. ``options`` apply to every connection.
    """

    path = f"/v1/tasks/runs/{run_id}/events"

    async def events() -> AsyncIterator[RunEvent]:
        # No cancel scope may span a yield in an async generator: the deadline bounds each
        # await instead (opening a connection, every chunk read, every pause).
        deadline = None if timeout is None else anyio.current_time() + timeout
        budget = StreamBudget(STREAM_READ_TIMEOUT, deadline)
        replays = Replays()
        quiet = 0
        while not budget.passed():
            replays.new_connection()
            terminal = fresh = failed = False
            try:
                async with AsyncExitStack() as stack:
                    resp = await _connect(
                        stack, client, path, {}, betas, budget=budget, options=options
                    )
                    if resp is None:  # the deadline passed while connecting
                        return
                    async for sse in _sse_events(client, resp, path, budget):
                        if not sse.data:
                            continue
                        event = decode_run_event(sse.data)
                        if isinstance(event, TaskRunStateEvent):
                            terminal = event.run.status in TERMINAL_STATUSES
                        if replays.is_replay(event):
                            continue
                        budget.failures = 0
                        fresh = True
                        yield event
                        if budget.passed():
                            return
                if not terminal:
                    budget.ended_quietly(path)
            except (DisconnectedError, TransportTimeoutError) as exc:
                budget.failed(exc)  # raises when the call cannot go on
                failed = True
            if failed:  # outside the except block (see _cursor_stream)
                await _pause(client, path, budget.failures, deadline)
                continue
            if terminal:
                return
            # The server ended the stream before the run did (its ~570 s lifetime): come
            # back, and not in a tight loop if it keeps closing at once.
            quiet = quiet + 1 if not fresh else 0
            if quiet:
                await _pause(client, path, quiet, deadline)

    return EventStream(events())

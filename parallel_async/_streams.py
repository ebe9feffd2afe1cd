"""Server-sent event streams over the client, with transparent reconnects.

Two resume models, as the API has them:

* group streams (``/groups/{id}/events`` and ``/groups/{id}/runs``) carry an ``event_id`` cursor:
  after a disconnect we reconnect with ``last_event_id`` so no event is lost or doubled;
* run streams (``/runs/{id}/events``) have no cursor and replay everything on reconnect (and the
  API closes them after about 570 s): we reconnect and drop what we already yielded, until the
  run reaches a terminal state or the caller's deadline.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import msgspec

from ._errors import DisconnectedError, TransportTimeoutError
from ._events import (
    ErrorEvent,
    GroupEvent,
    RunEvent,
    TaskGroupStatusEvent,
    TaskRunProgressMessageEvent,
    TaskRunProgressStatsEvent,
    TaskRunStateEvent,
    decode_group_event,
    decode_run_event,
)
from ._models import TERMINAL_STATUSES
from ._protocol import error_from_response
from ._retry import call_with_retry
from ._sse import ServerSentEvent, SSEDecoder
from ._transport import StreamResponse, open_stream

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["EventStream", "group_event_stream", "group_runs_stream", "run_event_stream"]

E = TypeVar("E")

# A stream may sit idle while runs work; the read timeout only catches a dead connection.
STREAM_READ_TIMEOUT = 300.0
MAX_RECONNECTS = 50


class EventStream(Generic[E]):
    """An async iterator of typed events; close it (or leave ``async with``) to disconnect.

    ``async for event in stream`` ends when the server ends the stream for good (the run or
    group finished, or the ``api_timeout`` you gave passed).
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
    read_timeout: float = STREAM_READ_TIMEOUT,
) -> AbstractAsyncContextManager[StreamResponse]:
    """Open a stream; the opening request goes through the retry policy like any GET."""

    @asynccontextmanager
    async def opened() -> AsyncIterator[StreamResponse]:
        transport = client._open()
        headers = {**client._headers(betas, json_body=False), "Accept": "text/event-stream"}
        cm: AbstractAsyncContextManager[StreamResponse] | None = None

        async def attempt() -> StreamResponse:
            nonlocal cm
            cm = open_stream(
                transport, path, headers=headers, params=params, read_timeout=read_timeout
            )
            resp = await cm.__aenter__()
            if 200 <= resp.status < 300:
                return resp
            try:
                body = await resp.read()
            finally:  # release the connection even if reading the error body fails
                with anyio.CancelScope(shield=True):
                    await cm.__aexit__(None, None, None)
                cm = None
            raise error_from_response(resp.status, resp.headers, body)

        resp = await call_with_retry(client.retry_policy, attempt, idempotent=True)
        assert cm is not None  # noqa: S101 - set by the successful attempt
        try:
            yield resp
        finally:
            with anyio.CancelScope(shield=True):
                await cm.__aexit__(None, None, None)

    return opened()


async def _sse_events(resp: StreamResponse) -> AsyncIterator[ServerSentEvent]:
    decoder = SSEDecoder()
    async for chunk in resp.chunks():
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.close():
        yield event


async def _cursor_stream(
    client: AsyncParallel,
    path: str,
    params: dict[str, str],
    decode: Callable[[str], Any],
    *,
    last_event_id: str | None,
    reconnect_while: Callable[[], bool],
) -> AsyncIterator[Any]:
    """Yield decoded events, resuming from the last ``event_id`` after any disconnect."""
    cursor = last_event_id
    failures = quiet = 0
    while True:
        query = dict(params)
        if cursor is not None:
            query["last_event_id"] = cursor
        got_any = False
        try:
            async with _open(client, path, query, None) as resp:
                async for sse in _sse_events(resp):
                    if not sse.data:
                        continue
                    event = decode(sse.data)
                    event_id = getattr(event, "event_id", None)
                    if event_id:
                        cursor = event_id
                    failures = 0
                    got_any = True
                    yield event
        except (DisconnectedError, TransportTimeoutError):
            failures += 1
            if failures > MAX_RECONNECTS:
                raise
            await anyio.sleep(min(0.05 * 2**failures, 2.0))
            continue
        if not reconnect_while():
            return
        quiet = 0 if got_any else quiet + 1
        if quiet:  # closed with nothing new: back off instead of spinning
            await anyio.sleep(min(0.05 * 2**quiet, 2.0))


def group_event_stream(
    client: AsyncParallel,
    task_group_id: str,
    *,
    last_event_id: str | None,
    api_timeout: float | None,
) -> EventStream[GroupEvent]:
    """``/groups/{id}/events``: resumed by cursor; reconnects while the group is active."""
    params: dict[str, str] = {}
    if api_timeout is not None:
        params["timeout"] = f"{api_timeout:g}"
    active = [True]

    def decode(data: str) -> GroupEvent:
        event = decode_group_event(data)
        if isinstance(event, TaskGroupStatusEvent):
            active[0] = event.status.is_active
        return event

    return EventStream(
        _cursor_stream(
            client,
            f"/v1/tasks/groups/{task_group_id}/events",
            params,
            decode,
            last_event_id=last_event_id,
            # A clean close while runs are active is the server's stream lifetime: go on,
            # unless the caller bounded the stream with api_timeout.
            reconnect_while=lambda: api_timeout is None and active[0],
        )
    )


def group_runs_stream(
    client: AsyncParallel,
    task_group_id: str,
    params: dict[str, str],
    *,
    last_event_id: str | None,
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
        )
    )


def _event_key(event: RunEvent) -> object:
    """What identifies a replayed event as one we already yielded."""
    if isinstance(event, TaskRunProgressMessageEvent):
        return (event.type, event.timestamp, event.message)
    if isinstance(event, TaskRunStateEvent):
        return ("state", event.run.status, event.output is not None)
    if isinstance(event, TaskRunProgressStatsEvent):
        return ("stats", event.progress_meter, msgspec.json.encode(event.source_stats))
    if isinstance(event, ErrorEvent):
        return ("error", event.error.message, event.error.ref_id)
    return None


def _first_time(seen: set[object], event: RunEvent) -> bool:
    """Record ``event``; False if an identical one was already yielded (a replay)."""
    key = _event_key(event)
    if key is None:
        return True
    if key in seen:
        return False
    seen.add(key)
    return True


def run_event_stream(
    client: AsyncParallel, run_id: str, *, timeout: float | None, betas: Sequence[str] | None
) -> EventStream[RunEvent]:
    """``/runs/{id}/events``: reconnects (the API replays) and drops the replayed events."""

    async def events() -> AsyncIterator[RunEvent]:
        # No cancel scope may span a yield in an async generator: the deadline is enforced
        # through the read timeout of each connection and checks between events.
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: set[object] = set()
        failures = quiet = 0
        while True:
            remaining = STREAM_READ_TIMEOUT if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return
            terminal = fresh = False
            try:
                async with _open(
                    client,
                    f"/v1/tasks/runs/{run_id}/events",
                    {},
                    betas,
                    read_timeout=min(STREAM_READ_TIMEOUT, remaining),
                ) as resp:
                    async for sse in _sse_events(resp):
                        if not sse.data:
                            continue
                        event = decode_run_event(sse.data)
                        failures = 0
                        if isinstance(event, TaskRunStateEvent):
                            terminal = event.run.status in TERMINAL_STATUSES
                        if not _first_time(seen, event):
                            continue
                        fresh = True
                        yield event
                        if deadline is not None and time.monotonic() >= deadline:
                            return
            except (DisconnectedError, TransportTimeoutError):
                failures += 1
                if failures > MAX_RECONNECTS:
                    raise
                if deadline is None or time.monotonic() < deadline:
                    await anyio.sleep(min(0.05 * 2**failures, 2.0))
                continue
            if terminal:
                return
            # The server ended the stream before the run did (its ~570 s lifetime): come
            # back, and not in a tight loop if it keeps closing at once.
            quiet = quiet + 1 if not fresh else 0
            if quiet:
                await anyio.sleep(min(0.05 * 2**quiet, 2.0))

    return EventStream(events())

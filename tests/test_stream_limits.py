"""Event streams against hostile servers: huge lines, silence. Every call ends, typed.

The servers are small aiohttp apps on 127.0.0.1 (``serve_stream``); every bound is only checked
by an ``anyio.fail_after`` guard, never timed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from aiohttp import web
from anyio.abc import SocketAttribute, SocketStream
from local_server import serve_stream

from parallel_async import (
    AsyncParallel,
    DisconnectedError,
    EventStream,
    EventTooLargeError,
    TaskGroupStatusEvent,
    TransportTimeoutError,
)
from parallel_async import _streams as streams
from parallel_async._sse import DEFAULT_MAX_LINE, SSEDecoder
from parallel_async._stream_budget import MAX_RECONNECTS
from parallel_async.testing import set_testing

pytestmark = pytest.mark.anyio

GUARD = 20.0  # seconds: a call still going then is a failure, not slowness
RUN_EVENTS = "/v1/tasks/runs/{run_id}/events"
GROUP_EVENTS = "/v1/tasks/groups/{group_id}/events"
GROUP_RUNS = "/v1/tasks/groups/{group_id}/runs"


def group_status(event_id: str, *, active: bool) -> bytes:
    status = {
        "num_task_runs": 1,
        "task_run_status_counts": {"running" if active else "completed": 1},
        "is_active": active,
    }
    data = {"type": "task_group_status", "event_id": event_id, "status": status}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


# --- the decoder ---------------------------------------------------------------------------------


def test_a_line_fed_in_pieces_fails_once_it_passes_the_limit() -> None:
    decoder = SSEDecoder(max_line=100, path="/v1/x")
    decoder.feed(b"data: " + b"x" * 60)
    with pytest.raises(EventTooLargeError) as info:
        decoder.feed(b"x" * 60)
    error = info.value
    assert error.limit == 100
    assert error.path == "/v1/x"
    assert error.status == 200
    assert error.body.startswith(b"data: xxx")
    assert "100 bytes" in str(error)
    assert "/v1/x" in str(error)


def test_a_whole_line_over_the_limit_in_one_chunk_fails() -> None:
    with pytest.raises(EventTooLargeError):
        SSEDecoder(max_line=100).feed(b"data: " + b"x" * 200 + b"\n\n")


def test_data_lines_adding_up_over_the_limit_fail() -> None:
    decoder = SSEDecoder(max_line=100)
    with pytest.raises(EventTooLargeError):
        for _ in range(10):
            decoder.feed(b"data: " + b"x" * 20 + b"\n")


def test_lines_and_events_up_to_the_limit_pass() -> None:
    decoder = SSEDecoder(max_line=100)
    line = b"data: " + b"x" * 94  # 100 bytes
    events = decoder.feed(line[:50]) + decoder.feed(line[50:] + b"\n\n")
    assert [len(e.data) for e in events] == [94]
    events = decoder.feed(b"data: " + b"y" * 40 + b"\ndata: " + b"y" * 40 + b"\n\n")
    assert [len(e.data) for e in events] == [81]


def test_the_error_keeps_only_the_start_of_the_line() -> None:
    with pytest.raises(EventTooLargeError) as info:
        SSEDecoder(max_line=10_000).feed(b"x" * 20_000)
    assert len(info.value.body) == 1024


# --- streams -------------------------------------------------------------------------------------


async def _huge_line(request: web.Request, response: web.StreamResponse, index: int) -> None:
    """A line that never ends: past the limit at once, then one more byte now and then."""
    await response.write(b"data: ")
    chunk = b"x" * (1024 * 1024)
    for _ in range(DEFAULT_MAX_LINE // len(chunk) + 1):
        await response.write(chunk)
    while True:  # until the client leaves
        await anyio.sleep(0.05)
        await response.write(b"x")


@pytest.mark.parametrize(
    ("path", "kind"),
    [(RUN_EVENTS, "run"), (GROUP_EVENTS, "group"), (GROUP_RUNS, "runs")],
)
async def test_an_unterminated_huge_line_fails_typed_on_the_first_connection(
    path: str, kind: str
) -> None:
    async with serve_stream(path, _huge_line) as (url, connections):
        async with AsyncParallel(api_key="k", base_url=url) as client:
            with anyio.fail_after(GUARD):
                stream: EventStream[Any]
                if kind == "run":
                    stream = await client.task_run.events("trun_1", timeout=GUARD / 2)
                elif kind == "group":
                    stream = await client.task_group.events("tgrp_1")
                else:
                    stream = await client.task_group.get_runs("tgrp_1")
                with pytest.raises(EventTooLargeError) as info:
                    async with stream:
                        async for _ in stream:
                            pass
    assert info.value.limit == DEFAULT_MAX_LINE
    assert info.value.path.startswith(("/v1/tasks/runs/trun_1", "/v1/tasks/groups/tgrp_1"))
    assert connections[0] == 1  # not downloaded again on a reconnect


# --- silence and reconnects: the budget of the whole call ---------------------------------------


async def _until_gone(request: web.Request) -> None:
    """Wait until the client hangs up (aiohttp would not cancel the handler)."""
    while request.transport is not None and not request.transport.is_closing():
        await anyio.sleep(0.02)


async def _silent(request: web.Request, response: web.StreamResponse, index: int) -> None:
    """Headers, then nothing: the server answers but never streams."""
    await _until_gone(request)


@asynccontextmanager
async def tcp_server(
    handle: Callable[[SocketStream], Awaitable[None]],
) -> AsyncIterator[tuple[str, list[int]]]:
    """A raw TCP server: ``handle`` each connection; yields the URL and a connection count."""
    connections = [0]

    async def serve(conn: SocketStream) -> None:
        connections[0] += 1
        async with conn:
            await handle(conn)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        try:
            yield f"http://127.0.0.1:{port}", connections
        finally:
            tg.cancel_scope.cancel()


async def _open_stream(client: AsyncParallel, kind: str, timeout: float) -> EventStream[Any]:
    if kind == "group":
        return await client.task_group.events("tgrp_1", timeout=timeout)
    return await client.task_group.get_runs("tgrp_1", timeout=timeout)


@pytest.mark.parametrize(("path", "kind"), [(GROUP_EVENTS, "group"), (GROUP_RUNS, "runs")])
async def test_a_group_stream_that_never_streams_fails_within_its_timeout(
    path: str, kind: str
) -> None:
    async with serve_stream(path, _silent) as (url, connections):
        async with AsyncParallel(api_key="k", base_url=url) as client:
            with anyio.fail_after(GUARD), pytest.raises(TransportTimeoutError) as info:
                async with await _open_stream(client, kind, 0.5) as stream:
                    async for _ in stream:
                        pass
    assert info.value.path.startswith("/v1/tasks/groups/tgrp_1/")
    assert connections[0] == 1  # not 51 connections, each through the retry policy


async def test_an_opening_that_never_answers_is_retried_by_the_policy_then_fails() -> None:
    async def mute(conn: SocketStream) -> None:
        await anyio.sleep_forever()  # accepts, reads nothing, answers nothing

    async with tcp_server(mute) as (url, connections):
        async with AsyncParallel(api_key="k", base_url=url) as client:
            with set_testing(), anyio.fail_after(GUARD), pytest.raises(TransportTimeoutError):
                async with await client.task_group.events("tgrp_1", timeout=0.2) as stream:
                    async for _ in stream:
                        pass
            attempts = client.retry_policy.attempts
        # the server may accept the last connection after the client gave up on it
        with anyio.fail_after(GUARD):
            while connections[0] < attempts:
                await anyio.sleep(0.005)
    assert connections[0] == attempts  # one opening, through the policy; no reconnects


async def test_a_run_stream_that_never_streams_fails_after_the_silence_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streams, "STREAM_READ_TIMEOUT", 0.5)  # 300 s otherwise
    async with serve_stream(RUN_EVENTS, _silent) as (url, connections):
        async with AsyncParallel(api_key="k", base_url=url) as client:
            with anyio.fail_after(GUARD), pytest.raises(TransportTimeoutError):
                async with await client.task_run.events("trun_1") as stream:
                    async for _ in stream:
                        pass
    assert connections[0] == 1


async def test_a_stream_that_falls_silent_after_data_is_resumed() -> None:
    async def write(request: web.Request, response: web.StreamResponse, index: int) -> None:
        if index == 0:
            await response.write(group_status("1", active=True))
            await _until_gone(request)  # then silent: a dead connection, resumed
            return
        assert request.query["last_event_id"] == "1"
        await response.write(group_status("2", active=False))

    async with serve_stream(GROUP_EVENTS, write) as (url, connections):
        async with AsyncParallel(api_key="k", base_url=url) as client:
            with anyio.fail_after(GUARD):  # the first event comes well within the timeout
                async with await client.task_group.events("tgrp_1", timeout=1.0) as stream:
                    got = [e async for e in stream]
    assert [e.event_id for e in got if isinstance(e, TaskGroupStatusEvent)] == ["1", "2"]
    assert connections[0] == 2


async def test_the_reconnect_budget_counts_every_attempt_of_the_whole_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def no_pause(attempt: int, deadline: float | None = None) -> None:
        await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(streams, "_backoff", no_pause)

    async def hang_up(conn: SocketStream) -> None:
        await conn.receive()  # the request, then close without answering

    async with tcp_server(hang_up) as (url, connections):
        async with AsyncParallel(api_key="k", base_url=url) as client:
            with set_testing(), anyio.fail_after(GUARD), pytest.raises(DisconnectedError):
                async with await client.task_group.events("tgrp_1") as stream:
                    async for _ in stream:
                        pass
    # One budget for the call: not MAX_RECONNECTS reconnects times the policy's attempts
    # (aiohttp itself sends a GET again once on a connection that closes without answering).
    assert MAX_RECONNECTS + 1 <= connections[0] <= 2 * (MAX_RECONNECTS + 1)

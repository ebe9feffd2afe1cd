"""Closing a client ends everything still using it, promptly and typed.

Servers hold their answers (a silent stream, a long-poll that never answers); another task
closes the client; every waiter must end with `ClientClosedError` well before any timeout.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from local_server import serve_app, serve_stream

from parallel_async import AsyncParallel, ClientClosedError, WrongEventLoopError
from parallel_async.testing import FakeParallel, FakeServer

pytestmark = pytest.mark.anyio

GUARD = 10.0  # seconds; every stream and request here would otherwise wait 300 s or more


def _run(status: str = "running") -> dict[str, Any]:
    return {"run_id": "trun_1", "status": status, "is_active": True, "processor": "base"}


def _group_status() -> bytes:
    status = {"num_task_runs": 1, "task_run_status_counts": {"running": 1}, "is_active": True}
    data = {"type": "task_group_status", "event_id": "1", "status": status}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _run_state() -> bytes:
    data = {"type": "task_run.state", "event_id": "1", "run": _run()}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def _one_event_then_silence(
    first: bytes,
) -> Callable[[web.Request, web.StreamResponse, int], Awaitable[None]]:
    async def write(request: web.Request, response: web.StreamResponse, index: int) -> None:
        await response.write(first)
        while request.transport is not None and not request.transport.is_closing():
            await anyio.sleep(0.02)  # silent until the client hangs up

    return write


async def _consume_until_closed(client: AsyncParallel, open_stream: Any) -> BaseException:
    """Iterate a stream in a task; close the client after its first event; return the error."""
    first = anyio.Event()
    errors: list[BaseException] = []

    async def consume() -> None:
        try:
            async with await open_stream() as stream:
                async for _ in stream:
                    first.set()
        except ClientClosedError as exc:
            errors.append(exc)

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await first.wait()
            await client.aclose()
    assert len(errors) == 1
    return errors[0]


@pytest.mark.parametrize("kind", ["run_events", "group_events", "get_runs"])
async def test_closing_the_client_ends_an_open_stream(kind: str) -> None:
    path = {
        "run_events": "/v1/tasks/runs/{run_id}/events",
        "group_events": "/v1/tasks/groups/{group_id}/events",
        "get_runs": "/v1/tasks/groups/{group_id}/runs",
    }[kind]
    first = _run_state() if kind != "group_events" else _group_status()
    async with serve_stream(path, await _one_event_then_silence(first)) as (url, _):
        client = AsyncParallel(api_key="k", base_url=url)
        opens = {
            "run_events": lambda: client.task_run.events("trun_1"),
            "group_events": lambda: client.task_group.events("tgrp_1"),
            "get_runs": lambda: client.task_group.get_runs("tgrp_1"),
        }
        error = await _consume_until_closed(client, opens[kind])
    assert "closed" in str(error)


async def test_closing_the_client_ends_a_stream_that_uses_an_injected_session() -> None:
    path = "/v1/tasks/runs/{run_id}/events"
    async with serve_stream(path, await _one_event_then_silence(_run_state())) as (url, _):
        async with aiohttp.ClientSession() as session:
            client = AsyncParallel(api_key="k", base_url=url, session=session)
            await _consume_until_closed(client, lambda: client.task_run.events("trun_1"))
            assert not session.closed  # not ours to close


async def test_closing_the_client_ends_a_long_poll() -> None:
    polling = anyio.Event()

    async def result(request: web.Request) -> web.Response:
        polling.set()
        while request.transport is not None and not request.transport.is_closing():
            await anyio.sleep(0.02)  # hold the long-poll until the client hangs up
        return web.Response(status=408)

    app = web.Application()
    app.router.add_get("/v1/tasks/runs/{run_id}/result", result)
    async with serve_app(app) as url:
        client = AsyncParallel(api_key="k", base_url=url)

        async def close_when_polling() -> None:
            await polling.wait()
            await client.aclose()

        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(close_when_polling)
                with pytest.raises(ClientClosedError, match="closed"):
                    await client.task_run.result("trun_1", api_timeout=600)


async def test_a_stream_opened_after_the_close_fails_at_once() -> None:
    client = AsyncParallel(api_key="k", base_url="http://127.0.0.1:9")
    await client.aclose()
    with pytest.raises(ClientClosedError):
        async with await client.task_run.events("trun_1") as stream:
            async for _ in stream:
                pass


# --- one client, one event loop -----------------------------------------------------------------


def test_a_client_used_on_a_second_event_loop_raises_a_typed_error() -> None:
    loop = asyncio.new_event_loop()
    server = FakeServer(FakeParallel(api_key="k"))
    try:
        loop.run_until_complete(server.start())
        client = AsyncParallel(api_key="k", base_url=server.url)
        loop.run_until_complete(client.task_group.create())  # opened on `loop`

        with pytest.raises(WrongEventLoopError, match="one client per event loop"):
            asyncio.run(client.task_group.create())
        with pytest.raises(WrongEventLoopError):
            anyio.run(client.task_run.retrieve, "trun_1")
        with pytest.raises(WrongEventLoopError):
            asyncio.run(_first_event(client))
        errors: list[BaseException] = []

        def in_a_thread() -> None:
            try:
                asyncio.run(client.task_group.create())
            except BaseException as exc:  # handed to the test thread
                errors.append(exc)

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join()
        assert [type(e) for e in errors] == [WrongEventLoopError]
        with pytest.raises(WrongEventLoopError):  # its session can only close on its loop
            asyncio.run(client.aclose())

        loop.run_until_complete(client.task_group.create())  # still fine on its own loop
        loop.run_until_complete(client.aclose())
        assert client.is_closed
    finally:
        loop.run_until_complete(server.close())
        loop.close()


async def _first_event(client: AsyncParallel) -> None:
    async with await client.task_run.events("trun_1") as stream:
        async for _ in stream:
            return


@pytest.mark.parametrize("strategy", ["group", "poll"])
async def test_closing_the_client_ends_a_running_map_with_client_closed_error(
    strategy: str,
) -> None:
    # Runs never finish (manual); the consumer has some outcomes in hand when another task
    # closes the client: the block ends at once with ClientClosedError, not per-run errors.
    fake = FakeParallel(manual=True)
    async with FakeServer(fake) as server:
        client = AsyncParallel(api_key="test-key", base_url=server.url, create_rate_limit=None)
        seen: list[Any] = []
        errors: list[BaseException] = []

        async def consume() -> None:
            try:
                async with client.map(
                    [f"x{i}" for i in range(20)],
                    processor="lite",
                    strategy="group" if strategy == "group" else "poll",
                ) as outcomes:
                    async for o in outcomes:
                        seen.append(o)
            except ClientClosedError as exc:
                errors.append(exc)

        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                while len(fake.runs) < 20:
                    await anyio.sleep(0.01)
                first = next(iter(fake.runs))
                fake.complete(first)
                while not seen:
                    await anyio.sleep(0.01)
                await client.aclose()
        assert len(errors) == 1  # the block ended with ClientClosedError, once
        assert [o.run_id for o in seen] == [first]
    fake.close()

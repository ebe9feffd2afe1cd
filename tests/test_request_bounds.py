"""Every request attempt has a total bound: an answer that trickles cannot hold a call.

The servers trickle one byte at a time, each well within the read timeout, so only a total
bound can end the attempt. Every bound is only checked by an ``anyio.fail_after`` guard.
"""

from __future__ import annotations

import json

import anyio
import pytest
from aiohttp import web
from local_server import serve_app

from parallel_async import AsyncParallel, TransportTimeoutError
from parallel_async import _task_run as task_run
from parallel_async._transport import UPLOAD_RATE, total_bound
from parallel_async.testing import set_testing

pytestmark = pytest.mark.anyio

GUARD = 10.0
RUN = {"run_id": "trun_1", "status": "completed", "is_active": False, "processor": "base"}
RESULT = json.dumps({"run": RUN, "output": {"type": "text", "content": "done"}}).encode()


async def _trickle(request: web.Request, body: bytes) -> web.StreamResponse:
    """Answer 200 with ``body``, one byte every 20 ms, until done or the client leaves."""
    response = web.StreamResponse(
        headers={"Content-Type": "application/json", "Content-Length": str(len(body))}
    )
    await response.prepare(request)
    try:
        for i in range(len(body)):
            await anyio.sleep(0.02)
            await response.write(body[i : i + 1])
    except ConnectionError:  # the client gave up
        pass
    return response


def test_the_bound_is_the_read_timeout_plus_connect_plus_the_upload() -> None:
    assert total_bound(60.0, 10.0) == 70.0
    assert total_bound(40.0, 10.0, 1) == 51.0
    assert total_bound(40.0, 10.0, 10 * UPLOAD_RATE) == 60.0
    assert total_bound(40.0, 10.0, 10 * UPLOAD_RATE + 1) == 61.0


async def test_a_trickling_answer_ends_at_the_clients_timeout() -> None:
    async def retrieve(request: web.Request) -> web.StreamResponse:
        return await _trickle(request, json.dumps(RUN).encode() * 100)  # ~100 s of trickle

    app = web.Application()
    app.router.add_get("/v1/tasks/runs/{run_id}", retrieve)
    async with serve_app(app) as url:
        # a connect timeout a local connection fits well within, even on a loaded machine
        client = AsyncParallel(
            api_key="k", base_url=url, timeout=0.3, connect_timeout=1.0, max_retries=0
        )
        async with client:
            with anyio.fail_after(GUARD), pytest.raises(TransportTimeoutError):
                await client.task_run.retrieve("trun_1")  # each byte within 0.3 s


async def test_a_trickling_long_poll_ends_at_its_wait_plus_the_margin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(task_run, "LONG_POLL_READ_MARGIN", 0.2)  # 10 s otherwise
    requests = 0

    async def result(request: web.Request) -> web.StreamResponse:
        nonlocal requests
        requests += 1
        if requests == 1:  # the first poll trickles for ~100 s
            return await _trickle(request, RESULT * 10)
        return web.Response(body=RESULT, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/tasks/runs/{run_id}/result", result)
    async with serve_app(app) as url:
        async with AsyncParallel(api_key="k", base_url=url, connect_timeout=0.3) as client:
            with set_testing(), anyio.fail_after(GUARD):
                got = await client.task_run.result("trun_1", api_timeout=1)
    assert got.output.content == "done"
    assert requests == 2  # the trickling poll was cut at 1 + 0.2 + 0.3 s and retried

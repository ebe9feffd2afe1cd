"""Drop-in calls: the official SDK's per-call and client options, with only the import changed."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp import web

from parallel_async import AsyncParallel, InvalidArgumentError, TransportTimeoutError
from parallel_async._task_run import TaskRunResource

pytestmark = pytest.mark.anyio

RUN = {
    "run_id": "trun_1",
    "status": "completed",
    "is_active": False,
    "processor": "lite",
    "created_at": "2026-01-01T00:00:00Z",
    "modified_at": "2026-01-01T00:00:01Z",
}


class Recorder:
    """A tiny API that records what it was sent; ``/slow`` paths never answer."""

    def __init__(self) -> None:
        self.seen: list[web.Request] = []
        self.bodies: list[Any] = []
        self.never = asyncio.Event()
        self.fail_next = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request)
        self.bodies.append(await request.json() if request.can_read_body else None)
        if self.fail_next:
            self.fail_next -= 1
            return web.json_response({"error": {"message": "boom", "ref_id": "r"}}, status=500)
        if request.query.get("slow"):
            await self.never.wait()
        path = request.path
        if request.method == "POST":
            return web.json_response({**RUN, "status": "queued", "is_active": True}, status=202)
        if path.endswith("/input"):
            return web.json_response({"input": "x", "processor": "lite"})
        if path.endswith("/result"):
            return web.json_response({"run": RUN, "output": {"type": "text", "content": "ok"}})
        return web.json_response(RUN)


@pytest.fixture
async def api() -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield rec, f"http://127.0.0.1:{port}"
    finally:
        rec.never.set()
        await runner.cleanup()


def sdk_parameters(name: str) -> set[str]:
    sdk = pytest.importorskip("parallel.resources.task_run")
    return set(inspect.signature(getattr(sdk.AsyncTaskRunResource, name)).parameters) - {"self"}


@pytest.mark.parametrize("name", ["create", "retrieve", "retrieve_input", "result", "execute"])
def test_every_sdk_argument_is_accepted(name: str) -> None:
    ours = set(inspect.signature(getattr(TaskRunResource, name)).parameters)
    assert sdk_parameters(name) <= ours


async def test_extras_reach_the_wire(api: tuple[Recorder, str]) -> None:
    rec, url = api
    extras: dict[str, Any] = {
        "extra_headers": {"x-trace": "t1"},
        "extra_query": {"flag": True, "n": 3},
    }
    async with AsyncParallel(
        api_key="k", base_url=url, default_headers={"x-team": "data"}
    ) as client:
        await client.task_run.create(
            input="x", processor="lite", extra_body={"client_tag": "a"}, timeout=5, **extras
        )
        await client.task_run.retrieve("trun_1", timeout=5, **extras)
        await client.task_run.retrieve_input("trun_1", **extras)
        result = await client.task_run.result("trun_1", extra_body={"ignored": 1}, **extras)
    assert result.output.content == "ok"
    assert len(rec.seen) == 4
    for request in rec.seen:
        assert request.headers["x-trace"] == "t1"
        assert request.headers["x-team"] == "data"
        assert request.query["flag"] == "true" and request.query["n"] == "3"
    assert rec.bodies[0]["client_tag"] == "a" and rec.bodies[0]["input"] == "x"
    assert rec.seen[3].query["timeout"]  # the long-poll parameter is still there


async def test_a_call_timeout_bounds_the_whole_call(api: tuple[Recorder, str]) -> None:
    _rec, url = api
    async with AsyncParallel(api_key="k", base_url=url) as client:
        with pytest.raises(TransportTimeoutError, match=r"within 0\.2 s"):
            await client.task_run.retrieve("trun_1", timeout=0.2, extra_query={"slow": 1})


async def test_client_options_of_the_sdk(api: tuple[Recorder, str]) -> None:
    rec, url = api
    async with AsyncParallel(api_key="k", base_url=url, max_retries=0, timeout=0.2) as client:
        rec.fail_next = 1
        with pytest.raises(Exception, match="boom"):
            await client.task_run.retrieve("trun_1")
        assert len(rec.seen) == 1  # max_retries=0: no second attempt
        with pytest.raises(TransportTimeoutError):
            await client.task_run.retrieve("trun_1", extra_query={"slow": 1})  # read timeout


def test_bad_options_fail_before_any_request() -> None:
    with pytest.raises(InvalidArgumentError, match="not both"):
        AsyncParallel(api_key="k", max_retries=1, retry=__import__("parallel_async").RetryPolicy())
    with pytest.raises(InvalidArgumentError, match="max_retries"):
        AsyncParallel(api_key="k", max_retries=-1)
    with pytest.raises(InvalidArgumentError, match="x-api-key"):
        AsyncParallel(api_key="k", default_headers={"X-API-Key": "other"})


async def test_bad_extras_fail_before_any_request(api: tuple[Recorder, str]) -> None:
    rec, url = api
    async with AsyncParallel(api_key="k", base_url=url) as client:
        with pytest.raises(InvalidArgumentError, match="extra_headers"):
            await client.task_run.retrieve("trun_1", extra_headers={"a": 1})  # type: ignore[dict-item]
        with pytest.raises(InvalidArgumentError, match="extra_body"):
            await client.task_run.create(input="x", processor="lite", extra_body={"a": object()})
        with pytest.raises(InvalidArgumentError, match="timeout"):
            await client.task_run.retrieve("trun_1", timeout=0)
    assert rec.seen == []
    assert msgspec.json.encode({"ok": True})  # msgspec is what encodes the merged body

"""Drop-in calls: the official SDK's per-call and client options, with only the import changed."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest
from aiohttp import web
from local_server import serve_app

from parallel_async import (
    AddRunsError,
    AsyncParallel,
    InvalidArgumentError,
    TaskGroupStatusEvent,
    TaskRunStateEvent,
    TransportTimeoutError,
)
from parallel_async._task_group import TaskGroupResource
from parallel_async._task_run import TaskRunResource

pytestmark = pytest.mark.anyio

GUARD = 30.0  # seconds: a call still going then hangs (the server never answers it)

RUN = {
    "run_id": "trun_1",
    "status": "completed",
    "is_active": False,
    "processor": "lite",
    "created_at": "2026-01-01T00:00:00Z",
    "modified_at": "2026-01-01T00:00:01Z",
}
STATUS = {"num_task_runs": 1, "task_run_status_counts": {"completed": 1}, "is_active": False}
GROUP = {"taskgroup_id": "tgrp_1", "status": STATUS, "created_at": "2026-01-01T00:00:00Z"}
SSE = {  # one event per stream path: all of them end the stream (group done, run terminal)
    "/events": {"type": "task_group_status", "event_id": "ev1", "status": STATUS},
    "/runs": {"type": "task_run.state", "event_id": "ev2", "run": RUN},
    "/run-events": {"type": "task_run.state", "run": RUN},
}


def sse(event: dict[str, Any]) -> web.Response:
    body = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
    return web.Response(body=body.encode(), content_type="text/event-stream")


RUN_INPUT = {"input": "x", "processor": "lite"}


class Recorder:
    """A tiny API that records what it was sent; ``?slow=1`` requests never answer."""

    def __init__(self) -> None:
        self.seen: list[web.Request] = []
        self.bodies: list[Any] = []
        self.never = asyncio.Event()
        self.fail_next = 0
        self.hang_streams = 0  # this many stream requests get no answer at all

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request)
        self.bodies.append(await request.json() if request.can_read_body else None)
        if self.fail_next:
            self.fail_next -= 1
            return web.json_response({"error": {"message": "boom", "ref_id": "r"}}, status=500)
        if request.query.get("slow"):
            await self.never.wait()
        path = request.path
        if request.headers.get("Accept") == "text/event-stream":
            if self.hang_streams:
                self.hang_streams -= 1
                await self.never.wait()
            if path.startswith("/v1/tasks/runs/"):
                return sse(SSE["/run-events"])
            return sse(SSE["/events" if path.endswith("/events") else "/runs"])
        if path.startswith("/v1/tasks/groups"):
            return self.group(request, path)
        if request.method == "POST":
            return web.json_response({**RUN, "status": "queued", "is_active": True}, status=202)
        if path.endswith("/input"):
            return web.json_response({"input": "x", "processor": "lite"})
        if path.endswith("/result"):
            return web.json_response({"run": RUN, "output": {"type": "text", "content": "ok"}})
        return web.json_response(RUN)

    def group(self, request: web.Request, path: str) -> web.Response:
        if request.method == "POST" and path.endswith("/runs"):
            n = len(self.bodies[-1]["inputs"])
            ids = [f"trun_{len(self.seen)}_{i}" for i in range(n)]
            answer = {"status": STATUS, "run_ids": ids, "run_cursor": "c", "event_cursor": "e"}
            return web.json_response(answer)
        if "/runs/" in path:
            return web.json_response(RUN)
        return web.json_response(GROUP)


@pytest.fixture
async def api() -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    async with serve_app(app) as url:
        try:
            yield rec, url
        finally:
            rec.never.set()  # before the server shuts down: it waits for its handlers


def sdk_parameters(module: str, cls: str, name: str) -> set[str]:
    sdk = pytest.importorskip(f"parallel.resources.{module}")
    return set(inspect.signature(getattr(getattr(sdk, cls), name)).parameters) - {"self"}


RUN_METHODS = ["create", "retrieve", "retrieve_input", "result", "execute", "events"]
GROUP_METHODS = ["create", "retrieve", "add_runs", "get_runs", "events", "retrieve_run"]


@pytest.mark.parametrize(
    ("module", "cls", "ours", "name"),
    [("task_run", "AsyncTaskRunResource", TaskRunResource, n) for n in RUN_METHODS]
    + [("task_group", "AsyncTaskGroupResource", TaskGroupResource, n) for n in GROUP_METHODS],
)
def test_every_sdk_argument_is_accepted(module: str, cls: str, ours: type, name: str) -> None:
    accepted = set(inspect.signature(getattr(ours, name)).parameters)
    assert sdk_parameters(module, cls, name) <= accepted


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


async def test_group_and_stream_extras_reach_the_wire(api: tuple[Recorder, str]) -> None:
    rec, url = api
    extras: dict[str, Any] = {"extra_headers": {"x-trace": "t1"}, "extra_query": {"flag": True}}
    inputs = [{"input": f"q{i}", "processor": "lite"} for i in range(1001)]  # two batches
    async with AsyncParallel(api_key="k", base_url=url) as client:
        group = await client.task_group.create(
            metadata={"team": "data"}, extra_body={"client_tag": "g"}, timeout=5, **extras
        )
        gid = group.taskgroup_id
        retrieved = await client.task_group.retrieve(gid, timeout=5, **extras)
        added = await client.task_group.add_runs(
            gid, inputs=inputs, extra_body={"client_tag": "r"}, timeout=30, **extras
        )
        await client.task_group.retrieve_run("trun_1", task_group_id=gid, timeout=5, **extras)
        group_events = await client.task_group.events(
            gid, api_timeout=10, timeout=30, extra_body={"ignored": 1}, **extras
        )
        runs = await client.task_group.get_runs(
            gid,
            last_event_id="c0",
            include_output=True,
            extra_headers={"x-trace": "t1"},
            extra_query={"flag": True, "last_event_id": "not-the-cursor"},
        )
        run_events = await client.task_run.events(
            "trun_1", timeout=5, extra_body={"x": 1}, **extras
        )
        seen = [type(e) for s in (group_events, runs, run_events) async for e in s]
    assert retrieved.status.is_active is False and len(added.run_ids) == 1001
    assert seen == [TaskGroupStatusEvent, TaskRunStateEvent, TaskRunStateEvent]
    methods = [(r.method, r.path.rsplit("/", 1)[-1]) for r in rec.seen]
    assert methods == [
        ("POST", "groups"),
        ("GET", "tgrp_1"),
        ("POST", "runs"),
        ("POST", "runs"),  # the second batch carries the extras too
        ("GET", "trun_1"),
        ("GET", "events"),
        ("GET", "runs"),
        ("GET", "events"),
    ]
    for request in rec.seen:
        assert request.headers["x-trace"] == "t1"
        assert request.query["flag"] == "true"
    assert rec.bodies[0] == {"metadata": {"team": "data"}, "client_tag": "g"}
    for batch in rec.bodies[2:4]:
        assert batch["client_tag"] == "r" and batch["inputs"]
    assert [len(b["inputs"]) for b in rec.bodies[2:4]] == [1000, 1]
    assert rec.seen[3].query["refresh_status"] == "true"  # the call's own parameters stay
    assert rec.seen[5].query["timeout"] == "10"  # api_timeout, not the SDK's timeout
    assert rec.seen[6].query.getall("last_event_id") == ["c0"]  # the cursor wins over extras
    assert rec.seen[6].query["include_output"] == "true"
    assert all(rec.bodies[i] is None for i in (5, 6, 7))  # extra_body never goes on a GET


async def test_a_stream_timeout_is_each_connections_read_timeout(
    api: tuple[Recorder, str],
) -> None:
    rec, url = api
    rec.hang_streams = 1  # the first connection never answers: resumed after `timeout`
    async with AsyncParallel(api_key="k", base_url=url) as client:
        started = time.monotonic()
        # the second connection answers well within the timeout, even on a loaded machine
        with anyio.fail_after(GUARD):  # a stream without the timeout would wait forever
            stream = await client.task_group.events("tgrp_1", timeout=1.0, extra_query={"n": 1})
            events = [e async for e in stream]
    assert time.monotonic() - started >= 1.0  # the silent connection was given up after 1 s
    assert [type(e) for e in events] == [TaskGroupStatusEvent]
    assert [r.query["n"] for r in rec.seen] == ["1", "1"]  # the extras on every connection


async def test_add_runs_timeout_bounds_the_whole_call(api: tuple[Recorder, str]) -> None:
    _rec, url = api
    inputs = [{"input": "x", "processor": "lite"}] * 3
    async with AsyncParallel(api_key="k", base_url=url) as client:
        # the server never answers: only the call's timeout ends it
        with anyio.fail_after(GUARD), pytest.raises(AddRunsError, match=r"within 0\.3 s") as caught:
            await client.task_group.add_runs(
                "tgrp_1", inputs=inputs, timeout=0.3, extra_query={"slow": 1}
            )
    assert isinstance(caught.value.__cause__, TransportTimeoutError)
    assert caught.value.unresolved == (0, 1, 2)  # sent, never answered: may be runs
    assert caught.value.run_ids == [None, None, None]


async def test_a_call_timeout_bounds_the_whole_call(api: tuple[Recorder, str]) -> None:
    _rec, url = api
    async with AsyncParallel(api_key="k", base_url=url) as client:
        with pytest.raises(TransportTimeoutError, match=r"within 0\.2 s"):
            await client.task_run.retrieve("trun_1", timeout=0.2, extra_query={"slow": 1})


async def test_client_options_of_the_sdk(api: tuple[Recorder, str]) -> None:
    rec, url = api
    # a read timeout far above a local answer's time, even on a loaded machine
    async with AsyncParallel(api_key="k", base_url=url, max_retries=0, timeout=1.0) as client:
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
        groups = client.task_group
        with pytest.raises(InvalidArgumentError, match="extra_headers"):
            await groups.retrieve("tgrp_1", extra_headers={"a": 1})  # type: ignore[dict-item]
        with pytest.raises(InvalidArgumentError, match="extra_query"):
            await groups.create(extra_query=[("a", 1)])  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="extra_body"):
            await groups.add_runs("tgrp_1", inputs=[RUN_INPUT], extra_body={"a": object()})
        with pytest.raises(InvalidArgumentError, match="timeout"):
            await groups.retrieve_run("trun_1", task_group_id="tgrp_1", timeout=-1)
        with pytest.raises(InvalidArgumentError, match="x-api-key"):
            await groups.events("tgrp_1", extra_headers={"x-api-key": "other"})
        with pytest.raises(InvalidArgumentError, match="timeout"):
            await groups.get_runs("tgrp_1", timeout=0)
        with pytest.raises(InvalidArgumentError, match="extra_body"):
            await client.task_run.events("trun_1", extra_body="x")  # type: ignore[arg-type]
    assert rec.seen == []
    assert msgspec.json.encode({"ok": True})  # msgspec is what encodes the merged body

"""Event streams (``_streams``) against small local HTTP servers on 127.0.0.1.

Two kinds of server: an aiohttp app (chunked bodies, like the API) and a raw HTTP/1.1 server
whose bodies are delimited by the connection close (no chunked encoding, no length), so that a
stream can end *cleanly* in the middle of an event. No test sleeps to wait for something: every
wait is on a server event, and every timing is only bounded by ``anyio.fail_after``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from aiohttp import web
from anyio.abc import SocketAttribute, SocketStream
from local_server import serve_stream

from parallel_async import AsyncParallel
from parallel_async import _streams as streams
from parallel_async._events import (
    TaskGroupStatusEvent,
    TaskRunProgressMessageEvent,
    TaskRunProgressStatsEvent,
    TaskRunStateEvent,
)

pytestmark = pytest.mark.anyio

RUN_ID = "trun_1"
GROUP_ID = "tgrp_1"
GUARD = 10.0  # seconds: a stream that does not end by then is a failure, not slowness


# --- wire helpers -------------------------------------------------------------------------------


def run(status: str, run_id: str = RUN_ID) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "status": status,
        "is_active": status in {"queued", "running", "cancelling"},
        "processor": "pro",
        "created_at": "2025-04-23T20:21:48.037943Z",
        "modified_at": "2025-04-23T20:21:48.037943Z",
    }


def frame(data: dict[str, Any]) -> bytes:
    event_type: str = data["type"]
    return b"event: " + event_type.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def state(status: str, *, event_id: str | None = None, run_id: str = RUN_ID) -> bytes:
    data: dict[str, Any] = {
        "type": "task_run.state",
        "event_id": event_id,
        "run": run(status, run_id),
    }
    if status == "completed":
        data["output"] = {"type": "text", "content": "done", "basis": []}
    return frame(data)


def message(text: str, kind: str = "search", timestamp: str | None = None) -> bytes:
    return frame({"type": f"task_run.progress_msg.{kind}", "message": text, "timestamp": timestamp})


def stats(meter: float) -> bytes:
    source_stats = {"num_sources_considered": 4, "num_sources_read": 2, "sources_read_sample": []}
    return frame(
        {"type": "task_run.progress_stats", "progress_meter": meter, "source_stats": source_stats}
    )


def group_status(event_id: str, *, active: bool = True) -> bytes:
    status = {
        "num_task_runs": 2,
        "task_run_status_counts": {"running": 2} if active else {"completed": 2},
        "is_active": active,
        "status_message": None,
        "modified_at": "2025-04-23T20:21:48.037943Z",
    }
    return frame({"type": "task_group_status", "event_id": event_id, "status": status})


def describe(event: object) -> str:
    """A short, comparable description of a run event."""
    if isinstance(event, TaskRunStateEvent):
        return f"state:{event.run.status}"
    if isinstance(event, TaskRunProgressMessageEvent):
        return f"msg:{event.message}"
    if isinstance(event, TaskRunProgressStatsEvent):
        return f"stats:{event.progress_meter:g}"
    raise AssertionError(event)


# --- servers ------------------------------------------------------------------------------------


@asynccontextmanager
async def close_delimited_server(
    respond: Callable[[int, str], bytes],
) -> AsyncIterator[tuple[str, list[str]]]:
    """A raw HTTP/1.1 server: answer ``respond(connection_index, target)``, then close cleanly.

    The body has no ``Content-Length`` and no chunked encoding: it ends with the connection,
    so a client cannot tell a body cut in the middle of an event from a complete one by the
    framing. Yields the base URL and the list of request targets received.
    """
    targets: list[str] = []

    async def handle(conn: SocketStream) -> None:
        async with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await conn.receive()
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
            index = len(targets)
            targets.append(target)
            await conn.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                + respond(index, target)
            )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield f"http://127.0.0.1:{port}", targets
        finally:
            tg.cancel_scope.cancel()


Handler = Callable[[web.Request, web.StreamResponse, int], Any]


sse_app = serve_stream  # one helper for the custom stream servers (tests/local_server.py)


def client_for(url: str) -> AsyncParallel:
    return AsyncParallel(api_key="test-key", base_url=url)


# --- 1. a clean close in the middle of an event is a cut, resumed -------------------------------


async def test_get_runs_resumes_after_a_clean_close_in_the_middle_of_an_event() -> None:
    events = [state("completed", event_id=str(i), run_id=f"trun_{i}") for i in range(1, 5)]

    def respond(index: int, target: str) -> bytes:
        if index == 0:
            assert "last_event_id" not in target
            return events[0] + events[1] + events[2][:40]  # half of event 3, then a clean FIN
        assert "last_event_id=2" in target
        return events[2] + events[3]

    async with close_delimited_server(respond) as (url, targets), client_for(url) as client:
        with anyio.fail_after(GUARD):
            stream = await client.task_group.get_runs(GROUP_ID)
            got = [e.run.run_id async for e in stream if isinstance(e, TaskRunStateEvent)]
    assert got == ["trun_1", "trun_2", "trun_3", "trun_4"]  # every run once, in order
    assert len(targets) == 2


async def test_group_events_resume_after_a_close_right_after_an_event_line() -> None:
    # The cut falls on a line boundary: the event line of the third event came, its data not.
    run_done = state("completed", event_id="2", run_id="trun_a")

    def respond(index: int, target: str) -> bytes:
        if index == 0:
            return group_status("1") + run_done + b"event: task_run.state\n"
        assert "last_event_id=2" in target
        return state("completed", event_id="3", run_id="trun_b") + group_status("4", active=False)

    async with close_delimited_server(respond) as (url, targets), client_for(url) as client:
        with anyio.fail_after(GUARD):
            # api_timeout: a clean end of the stream would be final, so only the cut resumes it
            stream = await client.task_group.events(GROUP_ID, api_timeout=30)
            got = [getattr(e, "event_id", None) async for e in stream]
    assert got == ["1", "2", "3", "4"]
    assert len(targets) == 2


async def test_run_events_resume_after_a_clean_close_in_the_middle_of_an_event() -> None:
    first = [state("running"), message("Searching the web"), message("Reading sources")]

    def respond(index: int, target: str) -> bytes:
        if index == 0:
            return first[0] + first[1] + first[2][:30]
        return b"".join(first) + stats(50) + state("completed")

    async with close_delimited_server(respond) as (url, targets), client_for(url) as client:
        with anyio.fail_after(GUARD):
            got = [describe(e) async for e in await client.task_run.events(RUN_ID, timeout=30)]
    assert got == [
        "state:running",
        "msg:Searching the web",
        "msg:Reading sources",
        "stats:50",
        "state:completed",
    ]
    assert len(targets) == 2


# --- 2. the deadline of task_run.events holds while nothing new arrives -------------------------


async def test_run_events_deadline_holds_while_only_comments_and_replays_arrive() -> None:
    async def handler(request: web.Request, response: web.StreamResponse, index: int) -> None:
        await response.write(state("running") + message("Searching the web"))
        if index == 0:
            return  # the server's stream lifetime: the client reconnects and gets a replay
        while True:  # only keep-alives from now on, until the client leaves
            await anyio.sleep(0.05)
            await response.write(b": ping\n\n")

    async with sse_app("/v1/tasks/runs/{run_id}/events", handler) as (url, connections):
        async with client_for(url) as client:
            with anyio.fail_after(GUARD):
                # a deadline far above a reconnect's time, even on a loaded machine
                stream = await client.task_run.events(RUN_ID, timeout=1.0)
                got = [describe(e) async for e in stream]  # ends: no exception at the deadline
    assert got == ["state:running", "msg:Searching the web"]
    assert connections[0] == 2


async def test_run_events_deadline_while_the_stream_sends_nothing() -> None:
    done = anyio.Event()

    async def handler(request: web.Request, response: web.StreamResponse, index: int) -> None:
        await response.write(state("running"))
        await done.wait()  # silent, not closed

    async with sse_app("/v1/tasks/runs/{run_id}/events", handler) as (url, _):
        async with client_for(url) as client:
            with anyio.fail_after(GUARD):  # a deadline the first event arrives well within
                got = [describe(e) async for e in await client.task_run.events(RUN_ID, timeout=1.0)]
            done.set()
    assert got == ["state:running"]


# --- 3. replays are dropped, genuine repeats are not --------------------------------------------


async def test_identical_messages_on_one_connection_are_all_delivered() -> None:
    async def handler(request: web.Request, response: web.StreamResponse, index: int) -> None:
        same = message("Searching the web", timestamp=None)
        await response.write(state("running") + same + same + stats(10) + stats(10))
        await response.write(state("completed"))

    async with sse_app("/v1/tasks/runs/{run_id}/events", handler) as (url, connections):
        async with client_for(url) as client:
            with anyio.fail_after(GUARD):
                got = [describe(e) async for e in await client.task_run.events(RUN_ID)]
    assert got == [
        "state:running",
        "msg:Searching the web",
        "msg:Searching the web",
        "stats:10",
        "stats:10",
        "state:completed",
    ]
    assert connections[0] == 1


async def test_a_full_replay_after_a_reconnect_is_dropped_and_new_repeats_kept() -> None:
    same = message("Searching the web", timestamp=None)
    other = message("Reading sources", timestamp="2025-04-23T20:21:50Z")

    async def handler(request: web.Request, response: web.StreamResponse, index: int) -> None:
        # Every connection replays the trace so far (and only the latest stats).
        if index == 0:
            await response.write(state("running") + same + same + other + stats(25))
            return  # closed before the run ended
        if index == 1:  # the replay, then new events: a third copy of the same message
            await response.write(state("running") + same + same + other + stats(25))
            await response.write(same + stats(50))
            return
        await response.write(state("running") + same + same + other + same + stats(50))
        await response.write(same + state("completed"))

    async with sse_app("/v1/tasks/runs/{run_id}/events", handler) as (url, connections):
        async with client_for(url) as client:
            with anyio.fail_after(GUARD):
                got = [describe(e) async for e in await client.task_run.events(RUN_ID)]
    assert got == [
        "state:running",
        "msg:Searching the web",
        "msg:Searching the web",
        "msg:Reading sources",
        "stats:25",
        "msg:Searching the web",  # new on the second connection
        "stats:50",
        "msg:Searching the web",  # new on the third
        "state:completed",
    ]
    assert connections[0] == 3


async def test_a_replay_after_a_cut_stream_is_dropped() -> None:
    same = message("Searching the web", timestamp=None)
    trace = state("running") + same + same + stats(25)

    async def handler(request: web.Request, response: web.StreamResponse, index: int) -> None:
        if index == 0:
            await response.write(trace + same[:20])  # then the chunked body is left unfinished
            assert request.transport is not None
            request.transport.close()
            return
        await response.write(trace + same + state("completed"))

    async with sse_app("/v1/tasks/runs/{run_id}/events", handler) as (url, connections):
        async with client_for(url) as client:
            with anyio.fail_after(GUARD):
                got = [describe(e) async for e in await client.task_run.events(RUN_ID)]
    assert got == [
        "state:running",
        "msg:Searching the web",
        "msg:Searching the web",
        "stats:25",
        "msg:Searching the web",
        "state:completed",
    ]
    assert connections[0] == 2


# --- 4. a replayed group status is no progress for the reconnect backoff ------------------------


async def test_group_stream_backs_off_while_reconnects_bring_only_the_same_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backoffs: list[int] = []

    async def record(attempt: int, deadline: float | None = None) -> None:
        backoffs.append(attempt)
        await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(streams, "_backoff", record)

    async def handler(request: web.Request, response: web.StreamResponse, index: int) -> None:
        # Each connection opens with the group's (unchanged) status, then the server ends it.
        if index < 5:
            await response.write(group_status(str(10 + index)))
        if index == 2:
            await response.write(state("completed", event_id="20", run_id="trun_a"))
        if index == 5:
            await response.write(group_status("30", active=False))

    async with sse_app("/v1/tasks/groups/{group_id}/events", handler) as (url, connections):
        async with client_for(url) as client:
            with anyio.fail_after(GUARD):
                stream = await client.task_group.events(GROUP_ID)
                got = [e async for e in stream]
    assert connections[0] == 6
    assert sum(isinstance(e, TaskGroupStatusEvent) for e in got) == 6
    # connection 1: a new status (no pause); 2: the same again (pause 1); 3: a run finished
    # (progress: no pause); 4, 5: the same status (pauses 1, 2); 6: inactive, the end.
    assert backoffs == [1, 1, 2]

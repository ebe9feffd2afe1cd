"""Event streams against hostile servers: huge lines, silence. Every call ends, typed.

The servers are small aiohttp apps on 127.0.0.1 (``serve_stream``); every bound is only checked
by an ``anyio.fail_after`` guard, never timed.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from aiohttp import web
from local_server import serve_stream

from parallel_async import AsyncParallel, EventStream, EventTooLargeError
from parallel_async._sse import DEFAULT_MAX_LINE, SSEDecoder

pytestmark = pytest.mark.anyio

GUARD = 20.0  # seconds: a call still going then is a failure, not slowness
RUN_EVENTS = "/v1/tasks/runs/{run_id}/events"
GROUP_EVENTS = "/v1/tasks/groups/{group_id}/events"
GROUP_RUNS = "/v1/tasks/groups/{group_id}/runs"


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

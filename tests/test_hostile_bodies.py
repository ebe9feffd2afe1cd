"""Hostile answers: whatever a body does to the decoder ends as one typed error, never more.

A body nested deeper than msgspec's recursion limit (``[`` x 1000 + ``]`` x 1000, 2 KB) makes it
raise ``RecursionError``; every decoding path must turn that (or anything else) into the typed
error of that one answer, so that one run's bad answer never tears a fan-out down.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from aiohttp import web
from local_server import serve_app

from parallel_async import AsyncParallel, DecodeError, InternalServerError, OutputValidationError
from parallel_async._events import decode_group_event, decode_run_event
from parallel_async._models import TaskRunResult
from parallel_async._protocol import (
    TASK_RUN_RESULT_DECODER,
    decode,
    decode_run_input,
    error_from_response,
)
from parallel_async._typed import parse_output
from parallel_async.testing import set_testing

pytestmark = pytest.mark.anyio

DEEP = b"[" * 1000 + b"]" * 1000
# Typed decoders refuse a bare array at its first byte; the recursion bites where any JSON
# value is allowed: a result's content, an event of an unknown type, an error body.
DEEP_RESULT = (
    b'{"run": {"run_id": "trun_deep", "status": "completed", "is_active": false, '
    b'"processor": "base"}, "output": {"type": "json", "basis": [], "content": {"a": '
    + DEEP
    + b"}}}"
)
DEEP_EVENT = b'{"type": "task_run.something_new", "data": ' + DEEP + b"}"


def _run(run_id: str, status: str = "completed") -> dict[str, Any]:
    return {"run_id": run_id, "status": status, "is_active": False, "processor": "base"}


def _result(run_id: str) -> bytes:
    output = {"type": "json", "content": {"name": run_id}, "basis": []}
    return json.dumps({"run": _run(run_id), "output": output}).encode()


def test_a_deep_body_is_a_decode_error_carrying_status_and_body() -> None:
    with pytest.raises(DecodeError) as info:
        decode(TASK_RUN_RESULT_DECODER, 200, DEEP_RESULT)
    assert info.value.status == 200
    assert info.value.body == DEEP_RESULT
    assert "RecursionError" in str(info.value)
    deep_input = b'{"input": {"a": ' + DEEP + b'}, "processor": "base"}'
    with pytest.raises(DecodeError) as info:
        decode_run_input(200, deep_input)
    assert info.value.body == deep_input


def test_a_deep_error_body_still_gives_the_status_error() -> None:
    error = error_from_response(500, {}, DEEP)
    assert isinstance(error, InternalServerError)
    assert error.status == 500
    assert error.body == DEEP


@pytest.mark.parametrize("decoder", [decode_run_event, decode_group_event])
@pytest.mark.parametrize("data", [DEEP, DEEP_EVENT])
def test_a_deep_event_is_a_decode_error(decoder: Any, data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decoder(data.decode())
    assert info.value.status == 200
    assert info.value.body == data


def test_typed_output_parsing_failing_any_way_is_an_output_validation_error() -> None:
    # Content that decoded fine can still break the conversion (here: a type whose own
    # constructor fails); the untyped result stays on the error.
    class Boom(msgspec.Struct):
        name: str

        def __post_init__(self) -> None:
            raise RecursionError("too deep")

    result = msgspec.json.decode(_result("trun_1"), type=TaskRunResult)
    with pytest.raises(OutputValidationError) as info:
        parse_output(result, Boom)
    assert info.value.result is result
    assert info.value.path == "$"
    assert "RecursionError" in str(info.value)


async def test_one_deep_result_is_one_decode_error_outcome_in_a_fan_out() -> None:
    good = [f"trun_{i}" for i in range(40)]
    bad = "trun_deep"

    async def result(request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        body = DEEP_RESULT if run_id == bad else _result(run_id)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/tasks/runs/{run_id}/result", result)
    run_ids = [*good[:20], bad, *good[20:]]
    async with serve_app(app) as url, AsyncParallel(api_key="k", base_url=url) as client:
        with set_testing():
            async with client.as_completed(run_ids, timeout=30) as outcomes:
                seen = {str(o.run_id): o async for o in outcomes}
    assert sorted(seen) == sorted(run_ids)  # every run has exactly one outcome
    assert all(seen[r].ok for r in good)
    error = seen[bad].error
    assert isinstance(error, DecodeError)
    assert error.status == 200
    assert error.body == DEEP_RESULT

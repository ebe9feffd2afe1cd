"""The drop-in task-run calls and the blocking result() loop, against the fake server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Literal

import anyio
import msgspec
import pytest
from aiohttp import web
from local_server import serve_app

from parallel_async import (
    AsyncParallel,
    InvalidArgumentError,
    JsonSchema,
    OutputValidationError,
    ParsedTaskRunResult,
    RunCancelledError,
    RunFailedError,
    RunInput,
    RunNotFoundError,
    RunTimeoutError,
    TaskRun,
    TaskRunJsonOutput,
    TaskRunResult,
    TaskRunTextOutput,
)
from parallel_async.testing import FakeParallel, FakeServer

pytestmark = pytest.mark.anyio

SPEC = {
    "output_schema": {
        "type": "json",
        "json_schema": {
            "type": "object",
            "properties": {"ceo": {"type": "string"}, "founded": {"type": "integer"}},
            "required": ["ceo", "founded"],
            "additionalProperties": False,
        },
    }
}


async def wait_until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait for a server-side condition (not a timed race: it fails only if it never holds)."""
    with anyio.fail_after(limit):
        while not predicate():
            await anyio.sleep(0.005)


async def test_drop_in_calls(client: AsyncParallel, fake_parallel: FakeParallel) -> None:
    run = await client.task_run.create(
        input={"company": "Acme"},
        processor="base",
        task_spec=SPEC,
        metadata={"row": 7},
        source_policy={"include_domains": ["acme.com"]},
        betas=["webhook-2025-08-12"],
    )
    assert isinstance(run, TaskRun)
    assert run.run_id.startswith("trun_") and run.status == "queued" and run.is_active
    assert run.metadata == {"row": 7}

    status = await client.task_run.retrieve(run.run_id)
    assert status.run_id == run.run_id

    result = await client.task_run.result(run.run_id, api_timeout=5)
    assert isinstance(result, TaskRunResult)
    assert result.run.status == "completed"
    assert isinstance(result.output, TaskRunJsonOutput)
    assert set(result.output.content) == {"ceo", "founded"}
    assert isinstance(result.output.content["founded"], int)
    assert result.output.basis_for("ceo") is not None

    stored = await client.task_run.retrieve_input(run.run_id)
    assert isinstance(stored, RunInput)
    assert stored.input == {"company": "Acme"}
    assert stored.task_spec is not None
    assert isinstance(stored.task_spec.output_schema, JsonSchema)
    assert fake_parallel.stats.runs_created == 1


async def test_text_output(client: AsyncParallel) -> None:
    run = await client.task_run.create(input="Summarise Acme", processor="lite", task_spec="a memo")
    result = await client.task_run.result(run.run_id)
    assert isinstance(result.output, TaskRunTextOutput)
    assert result.output.content


async def test_result_loops_over_408s_within_one_deadline(
    client: AsyncParallel, fake_parallel: FakeParallel
) -> None:
    fake_parallel.manual = True
    run = await client.task_run.create(input="slow", processor="core")
    got: list[TaskRunResult] = []

    async def wait() -> None:
        got.append(await client.task_run.result(run.run_id, api_timeout=30, timeout=60))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await wait_until(lambda: fake_parallel.stats.statuses[408] >= 3)
        fake_parallel.complete(run.run_id)
    assert got[0].run.run_id == run.run_id
    assert fake_parallel.stats.requests["result"] >= 4


async def test_result_raises_our_timeout_past_the_deadline(
    client: AsyncParallel, fake_parallel: FakeParallel
) -> None:
    fake_parallel.manual = True
    run = await client.task_run.create(input="slow", processor="core")
    # 408s come every 50 ms: the deadline leaves room for two of them and the status read
    # after the first, even on a loaded machine
    with pytest.raises(RunTimeoutError) as info:
        await client.task_run.result(run.run_id, api_timeout=30, timeout=1.0)
    err = info.value
    assert isinstance(err, TimeoutError)
    assert err.run_id == run.run_id
    assert err.last_status == "running"  # read once: a 408 carries no status
    assert "still running" in str(err)
    assert fake_parallel.stats.statuses[408] >= 2  # looped, never surfaced a 408


async def test_early_408s_are_not_polled_in_a_hot_loop(
    client: AsyncParallel, fake_parallel: FakeParallel
) -> None:
    # A server (or proxy) that answers 408 at once, whatever wait we ask for: the client
    # backs off (50 ms doubling to 1 s) instead of spinning thousands of requests.
    fake_parallel.manual = True
    fake_parallel.max_long_poll = 0.0
    run = await client.task_run.create(input="slow", processor="core")
    with pytest.raises(RunTimeoutError):
        await client.task_run.result(run.run_id, api_timeout=5, timeout=1.5)
    assert 3 <= fake_parallel.stats.requests["result"] <= 12
    ids = [(await client.task_run.create(input=f"s{i}", processor="core")).run_id for i in range(4)]
    fake_parallel.stats.reset()
    outcomes = await client.gather(ids, timeout=1.5)
    assert all(isinstance(o.error, RunTimeoutError) for o in outcomes)
    assert fake_parallel.stats.requests["result"] <= 4 * 12


async def test_404_means_failed(client: AsyncParallel, fake_parallel: FakeParallel) -> None:
    fake_parallel.manual = True
    run = await client.task_run.create(input="x", processor="base")
    fake_parallel.fail(run.run_id, message="no sources found")
    with pytest.raises(RunFailedError) as info:
        await client.task_run.result(run.run_id)
    assert info.value.run_id == run.run_id
    assert info.value.error is not None
    assert info.value.error.message == "no sources found"
    assert "no sources found" in str(info.value)


async def test_404_means_cancelled(client: AsyncParallel, fake_parallel: FakeParallel) -> None:
    fake_parallel.manual = True
    run = await client.task_run.create(input="x", processor="base")
    fake_parallel.cancel(run.run_id)
    with pytest.raises(RunCancelledError):
        await client.task_run.result(run.run_id)


async def test_404_means_not_found(client: AsyncParallel) -> None:
    with pytest.raises(RunNotFoundError) as info:
        await client.task_run.result("trun_00000000000000000000000000000000")
    assert info.value.run_id == "trun_00000000000000000000000000000000"


async def test_invalid_arguments_fail_before_any_request(
    client: AsyncParallel, fake_parallel: FakeParallel
) -> None:
    with pytest.raises(InvalidArgumentError, match="run_id"):
        await client.task_run.result("../../v1/tasks")
    with pytest.raises(InvalidArgumentError, match="api_timeout"):
        await client.task_run.result("trun_1", api_timeout=0)
    with pytest.raises(InvalidArgumentError, match="timeout"):
        await client.task_run.result("trun_1", timeout=-1)
    with pytest.raises(InvalidArgumentError, match="metadata key"):
        await client.task_run.create(input="x", processor="base", metadata={"k" * 20: "v"})
    assert sum(fake_parallel.stats.requests.values()) == 0


# --- what each request asks the server for --------------------------------------------------------


@pytest.fixture
async def recording_server() -> AsyncIterator[tuple[str, list[int]]]:
    """A tiny API that always answers 408 after a short hold and records each ``timeout``."""
    asked: list[int] = []

    async def result(request: web.Request) -> web.Response:
        asked.append(int(request.query["timeout"]))
        await anyio.sleep(0.05)
        return web.json_response(
            {"type": "error", "error": {"ref_id": "r", "message": "still active"}}, status=408
        )

    app = web.Application()
    app.router.add_get("/v1/tasks/runs/{run_id}/result", result)
    async with serve_app(app) as url:
        yield url, asked


async def test_each_request_asks_min_of_api_timeout_and_remaining_time(
    recording_server: tuple[str, list[int]],
) -> None:
    url, asked = recording_server
    async with AsyncParallel(api_key="k", base_url=url) as client:
        with pytest.raises(RunTimeoutError):
            await client.task_run.result("trun_1", api_timeout=30, timeout=1.3)
        assert asked[0] == 1  # floor(1.3) < 30
        assert all(a == 1 for a in asked)
        asked.clear()
        with pytest.raises(RunTimeoutError):
            await client.task_run.result("trun_1", api_timeout=1, timeout=0.3)
        assert asked and all(a == 1 for a in asked)


async def test_official_result_signature_is_accepted(fake_server: FakeServer) -> None:
    # Code written for parallel.AsyncParallel runs with only the import changed.
    async with AsyncParallel(api_key="test-key", base_url=fake_server.url) as client:
        run = await client.task_run.create(input="What is 2+2?", processor="lite")
        result = await client.task_run.result(run.run_id, api_timeout=3600, timeout=3600)
        assert result.run.run_id == run.run_id


# --- typed outputs, end to end ----------------------------------------------------------------


class Address(msgspec.Struct):
    """A postal address.

    Attributes:
        city: The city.
    """

    city: str


class Company(msgspec.Struct):
    """Facts about a company."""

    founded: Annotated[int, msgspec.Meta(description="Year the company was founded")]
    address: Address
    tags: list[str]
    ceo: str | None


async def test_execute_returns_a_typed_result(
    client: AsyncParallel, fake_parallel: FakeParallel
) -> None:
    result = await client.task_run.execute(input="Acme", processor="base", output=Company)
    assert isinstance(result, ParsedTaskRunResult)
    assert isinstance(result.output.parsed, Company)
    assert isinstance(result.output.parsed.address, Address)
    assert result.output.basis_for("founded") is not None
    stored = next(iter(fake_parallel.runs.values())).input
    schema = stored["task_spec"]["output_schema"]["json_schema"]
    assert schema["properties"]["founded"]["description"] == "Year the company was founded"
    assert "$ref" not in msgspec.json.encode(schema).decode()


async def test_content_that_does_not_fit_keeps_the_untyped_result(
    client: AsyncParallel, fake_parallel: FakeParallel
) -> None:
    fake_parallel.manual = True
    run = await client.task_run.create(input="Acme", processor="base", output=Company)
    fake_parallel.complete(
        run.run_id,
        content={"founded": "long ago", "address": {"city": "X"}, "tags": [], "ceo": None},
    )
    with pytest.raises(OutputValidationError) as info:
        await client.task_run.result(run.run_id, output=Company)
    assert info.value.content["founded"] == "long ago"
    assert "founded" in info.value.path
    assert info.value.result.run.run_id == run.run_id


@pytest.mark.parametrize("strategy", ["group", "poll"])
async def test_map_with_an_output_type(
    client: AsyncParallel, strategy: Literal["group", "poll"]
) -> None:
    async with client.map(
        ["a", "b", "c"],
        processor="base",
        output=Company,
        strategy=strategy,
    ) as outcomes:
        got = [o async for o in outcomes]
    assert len(got) == 3
    for o in got:
        assert o.ok
        assert isinstance(o.parsed, ParsedTaskRunResult)
        assert isinstance(o.parsed.output.parsed, Company)


async def test_output_and_task_spec_together_are_refused(client: AsyncParallel) -> None:
    with pytest.raises(InvalidArgumentError, match="either task_spec or output"):
        await client.task_run.create(input="x", processor="base", task_spec="s", output=Company)

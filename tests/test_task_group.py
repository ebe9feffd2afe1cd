"""Task groups, event streams with resume, and group-driven fan-out, against the fake server."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from parallel_async import (
    AddRunsError,
    AsyncParallel,
    PaymentRequiredError,
    RunFailedError,
    RunNotFoundError,
    RunTimeoutError,
)
from parallel_async._events import (
    TaskGroupStatusEvent,
    TaskRunProgressMessageEvent,
    TaskRunStateEvent,
)
from parallel_async.testing import FakeParallel, FakeServer, Fault, RunPlan

pytestmark = pytest.mark.anyio


def make_client(server: FakeServer, width: int = 16, **kwargs: Any) -> AsyncParallel:
    return AsyncParallel(
        api_key="test-key",
        base_url=server.url,
        max_in_flight=width,
        create_rate_limit=None,
        **kwargs,
    )


async def test_drop_in_group_calls(fake_server: FakeServer, fake_parallel: FakeParallel) -> None:
    async with make_client(fake_server) as client:
        group = await client.task_group.create(metadata={"job": "demo"})
        assert group.taskgroup_id.startswith("tgrp_")
        added = await client.task_group.add_runs(
            group.taskgroup_id,
            inputs=[{"input": "a", "processor": "base"}, {"input": "b", "processor": "lite"}],
        )
        assert len(added.run_ids) == 2
        run = await client.task_group.retrieve_run(
            added.run_ids[0], task_group_id=group.taskgroup_id
        )
        assert run.taskgroup_id == group.taskgroup_id
        finished: Counter[str] = Counter()
        async with await client.task_group.events(group.taskgroup_id) as events:
            async for event in events:
                if isinstance(event, TaskRunStateEvent):
                    finished[event.run.run_id] += 1
        assert finished == Counter(added.run_ids)
        status = await client.task_group.retrieve(group.taskgroup_id)
        assert status.status.num_task_runs == 2
        assert not status.status.is_active
        outputs = []
        async with await client.task_group.get_runs(
            group.taskgroup_id, include_input=True, include_output=True
        ) as runs:
            async for event in runs:
                assert isinstance(event, TaskRunStateEvent)
                outputs.append(event.output)
        assert len(outputs) == 2
        assert all(o is not None for o in outputs)


async def test_add_runs_of_2500_inputs_in_three_requests(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    fake_parallel.manual = True
    inputs = [{"input": f"row {i}", "processor": "lite"} for i in range(2500)]
    async with make_client(fake_server) as client:
        group = await client.task_group.create()
        added = await client.task_group.add_runs(group.taskgroup_id, inputs=inputs)
    assert fake_parallel.stats.requests["group_add_runs"] == 3
    assert len(set(added.run_ids)) == 2500
    assert fake_parallel.stats.runs_created == 2500
    for i in (0, 999, 1000, 2499):  # run_ids come back in input order
        assert fake_parallel.runs[added.run_ids[i]].input["input"] == f"row {i}"


@pytest.mark.parametrize("fault", [Fault.drop_after(), Fault.status(502)])
async def test_a_lost_add_runs_answer_is_reconciled_not_resent(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float], fault: Fault
) -> None:
    fake_parallel.manual = True
    async with make_client(fake_server) as client:
        group = await client.task_group.create()
        fake_parallel.faults.script("group_add_runs", [fault])
        inputs = [{"input": f"r{i}", "processor": "lite"} for i in range(30)]
        added = await client.task_group.add_runs(group.taskgroup_id, inputs=inputs)
    created = fake_parallel.stats.runs_created
    if fault.kind == "drop_after":
        assert created == 30  # the lost request made them all: nothing re-sent
        assert fake_parallel.stats.requests["group_add_runs"] == 1
    else:
        assert created == 30  # the 502 made none: sent again, once
        assert fake_parallel.stats.requests["group_add_runs"] == 2
    assert len(set(added.run_ids)) == 30
    for i, run_id in enumerate(added.run_ids):
        assert fake_parallel.runs[run_id].input["input"] == f"r{i}"


async def test_group_stream_cut_anywhere_resumes_without_loss_or_doubles(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    fake_parallel.plan = lambda body: RunPlan(duration=0.0)
    async with make_client(fake_server) as client:
        group = await client.task_group.create()
        added = await client.task_group.add_runs(
            group.taskgroup_id,
            inputs=[{"input": f"r{i}", "processor": "lite"} for i in range(40)],
        )
        fake_parallel.faults.script(
            "group_events", [Fault.cut_stream(after_events=k) for k in (1, 7, 3, 11, 0, 5)]
        )
        seen: Counter[str] = Counter()
        statuses = 0
        async with await client.task_group.events(group.taskgroup_id) as events:
            async for event in events:
                if isinstance(event, TaskRunStateEvent):
                    seen[event.run.run_id] += 1
                elif isinstance(event, TaskGroupStatusEvent):
                    statuses += 1
    assert seen == Counter(added.run_ids)  # each run's completion exactly once
    assert fake_parallel.stats.requests["group_events"] >= 7


async def test_run_events_reconnect_and_drop_replays(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    fake_parallel.run_stream_lifetime = 0.15
    fake_parallel.plan = lambda body: RunPlan(duration=0.6)
    async with make_client(fake_server) as client:
        run = await client.task_run.create(input="x", processor="pro")
        events = [e async for e in await client.task_run.events(run.run_id, timeout=30)]
    assert fake_parallel.stats.requests["run_events"] >= 2  # the server cut it at least once
    messages = [
        (e.type, e.timestamp, e.message)
        for e in events
        if isinstance(e, TaskRunProgressMessageEvent)
    ]
    assert len(messages) == len(set(messages))  # replayed messages dropped
    last = events[-1]
    assert isinstance(last, TaskRunStateEvent)
    assert last.run.status == "completed"
    assert last.output is not None


async def test_group_map_of_5000_runs_on_few_connections(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    n, width = 5000, 20
    fake_parallel.plan = lambda body: RunPlan(duration=(hash(body["input"]) % 7) / 20)
    seen: Counter[int] = Counter()
    async with make_client(fake_server, width) as client:
        async with client.map([f"in {i}" for i in range(n)], processor="lite") as outcomes:
            async for o in outcomes:
                assert o.ok, o.error
                seen[o.index] += 1
    assert len(seen) == n
    assert set(seen.values()) == {1}
    assert fake_parallel.stats.runs_created == n
    assert fake_parallel.stats.requests["group_add_runs"] == 5
    assert fake_parallel.stats.max_open_connections <= width + 2


async def test_group_map_reports_failures_and_deadlines(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    def plan(body: dict[str, Any]) -> RunPlan:
        kind = body["input"].split()[0]
        if kind == "fail":
            return RunPlan(duration=0.0, outcome="failed", error_message="boom")
        return RunPlan(duration=None if kind == "slow" else 0.0)

    fake_parallel.plan = plan
    inputs = [f"{k} {i}" for i, k in enumerate(["ok", "fail", "slow"] * 5)]
    async with make_client(fake_server, 4) as client:
        async with client.map(inputs, processor="base", run_timeout=1.0) as outcomes:
            got = {o.index: o async for o in outcomes}
    assert len(got) == 15
    for i, o in got.items():
        kind = inputs[i].split()[0]
        if kind == "ok":
            assert o.ok
        elif kind == "fail":
            assert isinstance(o.error, RunFailedError)
            assert o.error.error is not None
            assert o.error.error.message == "boom"
        else:
            assert isinstance(o.error, RunTimeoutError)
    # failures came from the event stream, not from extra /result round trips
    assert fake_parallel.stats.statuses[404] == 0


async def test_as_completed_with_a_group(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    async with make_client(fake_server, 4) as client:
        group = await client.task_group.create()
        added = await client.task_group.add_runs(
            group.taskgroup_id, inputs=[{"input": f"r{i}", "processor": "lite"} for i in range(12)]
        )
        async with client.as_completed(
            added.run_ids, group=group.taskgroup_id, timeout=30
        ) as outcomes:
            results = [o async for o in outcomes]
    assert sorted(o.index for o in results) == list(range(12))
    assert all(o.ok for o in results)


async def test_as_completed_group_handles_repeated_and_foreign_ids(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    async with make_client(fake_server, 4) as client:
        group = await client.task_group.create()
        added = await client.task_group.add_runs(
            group.taskgroup_id, inputs=[{"input": f"r{i}", "processor": "lite"} for i in range(3)]
        )
        foreign = "trun_ffffffffffffffffffffffffffffffff"
        ids = [added.run_ids[0], added.run_ids[0], added.run_ids[1], foreign]
        with anyio.fail_after(30):
            async with client.as_completed(ids, group=group.taskgroup_id) as outcomes:
                got = {o.index: o async for o in outcomes}
    assert sorted(got) == [0, 1, 2, 3]
    assert got[0].ok and got[1].ok and got[2].ok
    assert isinstance(got[3].error, RunNotFoundError)


async def test_a_failing_group_stream_never_aborts_the_fan_out(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    fake_parallel.faults.script("group_events", [Fault.status(500)] * 40)
    async with make_client(fake_server, 4) as client:
        with anyio.fail_after(60):
            async with client.map([f"x{i}" for i in range(10)], processor="lite") as outcomes:
                got = [o async for o in outcomes]
    assert len(got) == 10
    assert all(o.ok for o in got)  # settled by polling /result instead


async def test_a_partly_failed_add_keeps_the_created_run_ids(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    fake_parallel.manual = True
    async with make_client(fake_server) as client:
        group = await client.task_group.create()
        fake_parallel.faults.script("group_add_runs", [Fault.ok(), Fault.status(402)])
        with pytest.raises(AddRunsError) as info:
            await client.task_group.add_runs(
                group.taskgroup_id,
                inputs=[{"input": f"r{i}", "processor": "lite"} for i in range(1001)],
            )
    ids = info.value.run_ids
    assert len(ids) == 1001
    assert all(r is not None for r in ids[:1000])
    assert ids[1000] is None
    assert isinstance(info.value.__cause__, PaymentRequiredError)
    assert fake_parallel.stats.runs_created == 1000


async def test_group_map_deadline_bounds_the_creates(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    async def slow_inputs() -> AsyncIterator[str]:
        yield "first"
        await anyio.sleep(1.0)  # the fan-out deadline passes while the source is quiet
        yield "late"

    async with make_client(fake_server, 4) as client:
        async with client.map(slow_inputs(), processor="lite", timeout=0.5) as outcomes:
            got = {o.input: o async for o in outcomes}
    assert got["first"].ok
    assert isinstance(got["late"].error, RunTimeoutError)
    assert got["late"].run_id is None
    assert fake_parallel.stats.runs_created == 1


async def test_group_map_of_nothing_creates_no_group(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    async with make_client(fake_server, 4) as client:
        nothing: list[str] = []
        async with client.map(nothing, processor="lite") as outcomes:
            assert [o async for o in outcomes] == []
    assert fake_parallel.stats.requests["group_create"] == 0

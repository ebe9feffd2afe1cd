"""Task groups, event streams with resume, and group-driven fan-out, against the fake server."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anyio
import pytest

from parallel_async import (
    AddRunsError,
    AsyncParallel,
    DisconnectedError,
    InvalidArgumentError,
    PaymentRequiredError,
    RunFailedError,
    RunNotFoundError,
    RunTimeoutError,
)
from parallel_async._add_runs import TAG_KEY
from parallel_async._defaults import RECONCILE_READ_ATTEMPTS
from parallel_async._events import (
    TaskGroupStatusEvent,
    TaskRunProgressMessageEvent,
    TaskRunStateEvent,
)
from parallel_async._task_group import TaskGroupResource
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
        client.task_group.reconcile_settle = 0  # nothing more will show up: don't wait
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


def spy_reads(
    monkeypatch: pytest.MonkeyPatch, before: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    """Record the arguments of every ``get_runs`` call; ``before(n)`` runs before the n-th."""
    original = TaskGroupResource.get_runs
    calls: list[dict[str, Any]] = []

    async def get_runs(self: TaskGroupResource, task_group_id: str, **kwargs: Any) -> Any:
        calls.append(kwargs)
        if before is not None:
            before(len(calls))
        return await original(self, task_group_id, **kwargs)

    monkeypatch.setattr(TaskGroupResource, "get_runs", get_runs)
    return calls


def rows(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [{"input": f"{prefix}{i}", "processor": "lite"} for i in range(n)]


async def test_a_lost_add_the_server_is_still_processing_is_not_sent_again(
    fake_server: FakeServer,
    fake_parallel: FakeParallel,
    no_sleep: list[float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two reads agree on "nothing" while the lost add is still being processed: wait."""
    fake_parallel.manual = True
    store = fake_parallel.group_store

    def before(n: int) -> None:
        if n == 3:  # two reads agree on "nothing" while the server is still at work
            store.release_adds()

    reads = spy_reads(monkeypatch, before)
    async with make_client(fake_server) as other, make_client(fake_server) as client:
        group = await client.task_group.create()
        await other.task_group.add_runs(group.taskgroup_id, inputs=rows(5, "other"))
        client.task_group.reconcile_settle = 30  # never elapses here: the runs must be found
        store.hold_adds()
        fake_parallel.faults.script("group_add_runs", [Fault.drop_after()])
        with anyio.fail_after(10):
            added = await client.task_group.add_runs(group.taskgroup_id, inputs=rows(10))
    assert fake_parallel.stats.requests["group_add_runs"] == 2  # other's, and ours once
    assert fake_parallel.stats.runs_created == 15
    assert [fake_parallel.runs[r].input["input"] for r in added.run_ids] == [
        f"r{i}" for i in range(10)
    ]
    # Tags come from run metadata (no inputs downloaded); later reads resume after the
    # runs the first one already saw.
    assert reads == [{"last_event_id": None}] + [{"last_event_id": "5"}] * 2
    assert added.status.num_task_runs == 15


async def test_a_lost_add_finished_after_the_resend_is_reported_as_duplicates(
    fake_server: FakeServer,
    fake_parallel: FakeParallel,
    no_sleep: list[float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_parallel.manual = True
    store = fake_parallel.group_store

    def before(n: int) -> None:
        if n == 2:  # the lost add completes after the settle period and the resend
            store.release_adds()

    reads = spy_reads(monkeypatch, before)
    async with make_client(fake_server) as client:
        client.task_group.reconcile_settle = 0
        group = await client.task_group.create()
        store.hold_adds(count=1)
        fake_parallel.faults.script("group_add_runs", [Fault.drop_after()])
        with pytest.raises(AddRunsError) as info:
            await client.task_group.add_runs(group.taskgroup_id, inputs=rows(10))
    error = info.value
    assert isinstance(error, AddRunsError)
    assert len(reads) == 2  # the reconciliation, then the check after the resend
    assert fake_parallel.stats.requests["group_add_runs"] == 2
    assert fake_parallel.stats.runs_created == 20
    assert not error.unresolved
    assert all(r is not None for r in error.run_ids)
    assert sorted(error.duplicates) == list(range(10))
    for i, run_id in enumerate(error.run_ids):
        assert run_id is not None
        (extra,) = error.duplicates[i]
        assert extra != run_id
        assert fake_parallel.runs[extra].input["input"] == fake_parallel.runs[run_id].input["input"]
        assert fake_parallel.runs[extra].metadata[TAG_KEY] == error.tags[i]
    assert "created twice" in str(error)


async def test_an_unprocessed_add_is_resent_only_after_the_settle_period(
    fake_server: FakeServer,
    fake_parallel: FakeParallel,
    no_sleep: list[float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_parallel.manual = True
    reads = spy_reads(monkeypatch)
    async with make_client(fake_server) as client:
        client.task_group.reconcile_settle = 0.3
        group = await client.task_group.create()
        fake_parallel.faults.script("group_add_runs", [Fault.status(502)])
        started = anyio.current_time()
        added = await client.task_group.add_runs(group.taskgroup_id, inputs=rows(10))
        waited = anyio.current_time() - started
    assert waited >= 0.3  # no conclusion before the settle period
    assert len(reads) >= 2  # read at once, then again until a read after the period
    assert fake_parallel.stats.requests["group_add_runs"] == 2
    assert fake_parallel.stats.runs_created == 10
    assert len(set(added.run_ids)) == 10
    with pytest.raises(InvalidArgumentError):
        client.task_group.reconcile_settle = -1


async def test_a_malformed_add_answer_is_reconciled(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    fake_parallel.manual = True
    async with make_client(fake_server) as client:
        client.task_group.reconcile_settle = 0
        group = await client.task_group.create()
        fake_parallel.faults.script("group_add_runs", [Fault.malformed()])
        added = await client.task_group.add_runs(group.taskgroup_id, inputs=rows(4))
    assert fake_parallel.stats.runs_created == 4
    assert len(set(added.run_ids)) == 4


async def test_reconciliation_reads_start_after_the_last_known_cursor(
    fake_server: FakeServer,
    fake_parallel: FakeParallel,
    no_sleep: list[float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_parallel.manual = True
    reads = spy_reads(monkeypatch)
    async with make_client(fake_server) as client:
        group = await client.task_group.create()
        await client.task_group.add_runs(group.taskgroup_id, inputs=rows(10, "a"))
        second = await client.task_group.add_runs(group.taskgroup_id, inputs=rows(10, "b"))
        assert second.run_cursor == "10"
        fake_parallel.faults.script("group_add_runs", [Fault.drop_after()])
        added = await client.task_group.add_runs(group.taskgroup_id, inputs=rows(10, "c"))
    assert reads == [{"last_event_id": "10"}]  # not from the start, and without inputs
    assert fake_parallel.stats.runs_created == 30
    assert [fake_parallel.runs[r].input["input"] for r in added.run_ids] == [
        f"c{i}" for i in range(10)
    ]


async def test_reconciliation_outlasts_failing_group_reads(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    fake_parallel.manual = True
    async with make_client(fake_server) as client:
        group = await client.task_group.create()
        fake_parallel.faults.script("group_add_runs", [Fault.drop_after()])
        # More 500s than one read's RetryPolicy takes: the read itself is tried again.
        fake_parallel.faults.script("group_runs", [Fault.status(500)] * 9)
        added = await client.task_group.add_runs(group.taskgroup_id, inputs=rows(6))
    assert fake_parallel.stats.requests["group_runs"] == 10
    assert fake_parallel.stats.requests["group_add_runs"] == 1
    assert fake_parallel.stats.runs_created == 6
    assert len(set(added.run_ids)) == 6


async def test_map_keeps_runs_whose_add_answer_was_lost_while_reads_fail(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    """500s on get_runs after a dropped add answer: the runs are still tracked."""
    fake_parallel.plan = lambda body: RunPlan(duration=0.0)
    fake_parallel.faults.script("group_add_runs", [Fault.drop_after()])
    fake_parallel.faults.script("group_runs", [Fault.status(500)] * 6)
    async with make_client(fake_server, 4) as client:
        with anyio.fail_after(30):
            async with client.map([f"x{i}" for i in range(5)], processor="lite") as outcomes:
                got = [o async for o in outcomes]
    assert len(got) == 5
    assert all(o.ok for o in got), [o.error for o in got]
    assert fake_parallel.stats.runs_created == 5


async def test_an_add_that_cannot_be_reconciled_is_unresolved_not_failed(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    fake_parallel.manual = True
    async with make_client(fake_server) as client:
        group = await client.task_group.create()
        fake_parallel.faults.script("group_add_runs", [Fault.drop_after()])
        fake_parallel.faults.probabilities("group_runs", {Fault.status(500): 1.0})
        with pytest.raises(AddRunsError) as info:
            await client.task_group.add_runs(group.taskgroup_id, inputs=rows(7))
    error = info.value
    assert isinstance(error, AddRunsError)
    assert error.run_ids == [None] * 7
    assert error.unresolved == tuple(range(7))  # unknown, not "not created"
    assert "unknown" in str(error)
    assert isinstance(error.__cause__, DisconnectedError)
    # bounded: RECONCILE_READ_ATTEMPTS reads, each under the client's RetryPolicy
    attempts = client.retry_policy.attempts
    assert fake_parallel.stats.requests["group_runs"] == RECONCILE_READ_ATTEMPTS * attempts
    assert fake_parallel.stats.requests["group_add_runs"] == 1  # never re-sent blindly
    # the runs do exist, and the tags find them
    created = {r.metadata[TAG_KEY] for r in fake_parallel.runs.values()}
    assert created == set(error.tags)


async def test_runs_read_before_the_group_became_unreadable_are_kept(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    fake_parallel.manual = True
    async with make_client(fake_server) as client:
        group = await client.task_group.create()
        fake_parallel.faults.script("group_add_runs", [Fault.drop_after()])
        fake_parallel.faults.script("group_runs", [Fault.cut_stream(after_events=3)])
        fake_parallel.faults.probabilities("group_runs", {Fault.status(500): 1.0})
        with pytest.raises(AddRunsError) as info:
            await client.task_group.add_runs(group.taskgroup_id, inputs=rows(7))
    error = info.value
    assert isinstance(error, AddRunsError)
    assert all(r is not None for r in error.run_ids[:3])
    assert error.run_ids[3:] == [None] * 4
    assert error.unresolved == (3, 4, 5, 6)
    for i, run_id in enumerate(error.run_ids[:3]):
        assert run_id is not None
        assert fake_parallel.runs[run_id].input["input"] == f"r{i}"


async def test_a_non_ambiguous_error_with_no_runs_is_raised_plain(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    async with make_client(fake_server) as client:
        group = await client.task_group.create()
        fake_parallel.faults.script("group_add_runs", [Fault.status(500), Fault.status(402)])
        client.task_group.reconcile_settle = 0
        with pytest.raises(PaymentRequiredError):
            await client.task_group.add_runs(group.taskgroup_id, inputs=rows(3))
    assert fake_parallel.stats.runs_created == 0
    assert fake_parallel.stats.requests["group_runs"] == 1  # the 500 was reconciled first


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
    fake_parallel.plan = lambda body: RunPlan(duration=None)  # ends when the test says
    events: list[Any] = []
    async with make_client(fake_server) as client:
        run = await client.task_run.create(input="x", processor="pro")

        async def follow() -> None:
            events.extend([e async for e in await client.task_run.events(run.run_id, timeout=30)])

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            # the server cut the stream once and the client came back: the run may end now
            with anyio.fail_after(30):
                while fake_parallel.stats.requests["run_events"] < 2:
                    await anyio.sleep(0.005)
            fake_parallel.complete(run.run_id)
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
    # An injected session with no connection limit of its own: the bound is the engine's.
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        make_client(fake_server, width, session=session) as client,
        client.map([f"in {i}" for i in range(n)], processor="lite") as outcomes,
    ):
        async for o in outcomes:
            assert o.ok, o.error
            seen[o.index] += 1
    assert len(seen) == n
    assert set(seen.values()) == {1}
    assert fake_parallel.stats.runs_created == n
    assert fake_parallel.stats.requests["group_add_runs"] == 5
    # max_in_flight requests, one add_runs and the group's event stream
    assert fake_parallel.stats.max_requests_in_flight <= width + 2
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
    first_done = anyio.Event()

    async def slow_inputs() -> AsyncIterator[str]:
        yield "first"
        await first_done.wait()
        # the fan-out deadline (1 s from the start, before "first" was read) passes while
        # the source is quiet
        await anyio.sleep(1.05)
        yield "late"

    got: dict[str | None, Any] = {}
    async with make_client(fake_server, 4) as client:
        async with client.map(slow_inputs(), processor="lite", timeout=1.0) as outcomes:
            async for o in outcomes:
                got[o.input] = o
                first_done.set()
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

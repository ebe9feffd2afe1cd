"""Group-driven tracking against the fake server: lazy sources, foreign runs, stale statuses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from parallel_async import AsyncParallel, RunTimeoutError
from parallel_async._defaults import RECONCILE_READ_ATTEMPTS
from parallel_async.testing import FakeParallel, FakeServer, Fault, RunPlan

pytestmark = pytest.mark.anyio


def make_client(server: FakeServer, width: int = 8) -> AsyncParallel:
    return AsyncParallel(
        api_key="test-key", base_url=server.url, max_in_flight=width, create_rate_limit=None
    )


async def wait_until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    with anyio.fail_after(limit):
        while not predicate():
            await anyio.sleep(0.005)


async def test_a_lazy_source_reuses_the_stream_instead_of_polling_it(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    # Each input is read only once the previous one has its outcome, so the group goes idle
    # between batches and the server ends its stream each time: the tracker comes back when
    # the next batch is added, not on a timer.
    n = 6
    delivered = anyio.Event()

    async def inputs() -> AsyncIterator[str]:
        nonlocal delivered
        for i in range(n):
            yield f"x{i}"
            await delivered.wait()
            delivered = anyio.Event()

    got: list[Any] = []
    async with make_client(fake_server) as client:
        async with client.map(inputs(), processor="lite") as outcomes:
            with anyio.fail_after(30):
                async for o in outcomes:
                    got.append(o)
                    delivered.set()
    assert sorted(o.index for o in got) == list(range(n)) and all(o.ok for o in got)
    assert fake_parallel.stats.requests["group_add_runs"] == n
    assert fake_parallel.stats.requests["group_events"] <= n + 2


async def test_as_completed_polls_runs_outside_the_group_at_once(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    # The group keeps one run going forever, so it never goes idle: a run outside it must not
    # wait for a group event that will never come.
    fake_parallel.plan = lambda body: RunPlan(duration=None if body["input"] == "member" else 0.0)
    async with make_client(fake_server) as client:
        group = await client.task_group.create()
        added = await client.task_group.add_runs(
            group.taskgroup_id, inputs=[{"input": "member", "processor": "lite"}]
        )
        outsider = await client.task_run.create(input="outsider", processor="lite")
        await client.task_run.result(outsider.run_id)
        ids = [added.run_ids[0], outsider.run_id]
        async with client.as_completed(ids, group=group.taskgroup_id, timeout=60) as outcomes:
            with anyio.fail_after(10):
                first = await outcomes.__anext__()
            assert first.run_id == outsider.run_id and first.ok
            fake_parallel.complete(added.run_ids[0])
            rest = [o async for o in outcomes]
    assert [o.run_id for o in rest] == [added.run_ids[0]] and rest[0].ok


async def test_a_replayed_idle_status_does_not_switch_to_polling(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    # The group was idle once (its log holds an inactive status), then got runs that are
    # still going: the replay of that old status must not make the tracker poll them.
    fake_parallel.manual = True
    async with make_client(fake_server) as client:
        group = await client.task_group.create()
        gid = group.taskgroup_id
        first = await client.task_group.add_runs(gid, inputs=[{"input": "a", "processor": "lite"}])
        fake_parallel.complete(first.run_ids[0])
        await wait_until(lambda: not fake_parallel.groups[gid].is_active)
        more = await client.task_group.add_runs(
            gid, inputs=[{"input": f"b{i}", "processor": "lite"} for i in range(5)]
        )
        fake_parallel.stats.reset()
        async with client.as_completed(more.run_ids, group=gid, timeout=60) as outcomes:
            await wait_until(lambda: fake_parallel.stats.requests["group_runs"] >= 1)
            await wait_until(lambda: fake_parallel.stats.requests["group_events"] >= 1)
            for run_id in more.run_ids:
                fake_parallel.complete(run_id)
            got = [o async for o in outcomes]
    assert sorted(o.run_id or "" for o in got) == sorted(more.run_ids)
    assert fake_parallel.stats.statuses[408] == 0
    assert fake_parallel.stats.requests["result"] == len(more.run_ids)


async def test_map_adopts_the_runs_of_an_add_it_could_not_reconcile(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    # The add's answer is lost and the group cannot be read for as long as add_runs tries:
    # its inputs are "unresolved", not failed. map finds their runs by tag in the group's
    # events and delivers them; nothing is created twice.
    fake_parallel.plan = lambda body: RunPlan(duration=0.0)
    fake_parallel.faults.script("group_add_runs", [Fault.drop_after()])
    async with make_client(fake_server, 4) as client:
        reads = RECONCILE_READ_ATTEMPTS * client.retry_policy.attempts
        fake_parallel.faults.script("group_runs", [Fault.status(500)] * reads)
        with anyio.fail_after(30):
            async with client.map([f"x{i}" for i in range(5)], processor="lite") as outcomes:
                got = [o async for o in outcomes]
    assert sorted(o.index for o in got) == list(range(5))
    assert all(o.ok for o in got), [o.error for o in got]
    assert fake_parallel.stats.runs_created == 5
    assert fake_parallel.stats.requests["group_add_runs"] == 1


async def test_a_lost_add_after_every_earlier_run_finished_does_not_hang(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    # The first batch is done (the tracker waits for the next batch), then the second add's
    # answer is lost and the group cannot be read while add_runs tries: its input is
    # unresolved. The tracker must wake up for it, find its run and deliver it.
    fake_parallel.faults.script("group_add_runs", [Fault.ok(), Fault.drop_after()])
    first_done = anyio.Event()

    async def inputs() -> AsyncIterator[str]:
        yield "a"
        await first_done.wait()
        yield "b"

    got: list[Any] = []
    async with make_client(fake_server) as client:
        reads = RECONCILE_READ_ATTEMPTS * client.retry_policy.attempts
        fake_parallel.faults.script("group_runs", [Fault.status(500)] * reads)
        async with client.map(inputs(), processor="lite") as outcomes:
            with anyio.fail_after(20):
                async for o in outcomes:
                    got.append(o)
                    first_done.set()
    assert sorted(o.input for o in got) == ["a", "b"] and all(o.ok for o in got)
    assert fake_parallel.stats.runs_created == 2


async def test_runs_of_a_lost_add_that_appear_late_are_adopted_not_failed(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    # The server accepts the add, hangs up, and creates the runs only later; meanwhile the
    # group reads fail, so add_runs cannot tell. The group then looks idle and its listing
    # is empty: the inputs must wait out the settle period, not fail at once.
    store = fake_parallel.group_store
    store.hold_adds()
    fake_parallel.faults.script("group_add_runs", [Fault.drop_after()])
    async with make_client(fake_server) as client:
        client.task_group.reconcile_settle = 30.0
        reads = RECONCILE_READ_ATTEMPTS * client.retry_policy.attempts
        fake_parallel.faults.script("group_runs", [Fault.status(500)] * reads)
        async with client.map(["a", "b"], processor="lite") as outcomes:
            with anyio.fail_after(20):
                # the group has been listed (and found empty) after add_runs gave up
                await wait_until(lambda: fake_parallel.stats.requests["group_runs"] > reads)
                store.release_adds()
                got = [o async for o in outcomes]
    assert sorted(o.input or "" for o in got) == ["a", "b"]
    assert all(o.ok for o in got), [o.error for o in got]
    assert fake_parallel.stats.runs_created == 2


async def test_the_fan_out_deadline_bounds_a_slow_add(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    fake_parallel.faults.script("group_add_runs", [Fault.slow(30)])
    async with make_client(fake_server) as client:
        with anyio.fail_after(10):
            async with client.map(["a", "b"], processor="lite", timeout=0.5) as outcomes:
                got = [o async for o in outcomes]
    assert len(got) == 2
    assert all(isinstance(o.error, RunTimeoutError) for o in got), [o.error for o in got]


async def test_a_source_that_ends_while_a_batch_lingers_sends_that_batch(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    async def inputs() -> AsyncIterator[str]:
        yield "a"
        await anyio.sleep(0.01)  # within the batch linger: "b" joins the same batch
        yield "b"
        await anyio.sleep(0.05)  # ends while that batch still waits for more

    async with make_client(fake_server) as client:
        async with client.map(inputs(), processor="lite") as outcomes:
            got = [o async for o in outcomes]
    assert sorted(o.input or "" for o in got) == ["a", "b"] and all(o.ok for o in got)


async def test_a_lost_first_add_of_a_lazy_source_does_not_hang(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    # No run was ever registered (the only batch so far is unresolved): the stream follower
    # must still start, find the run by its tag and deliver it.
    fake_parallel.faults.script("group_add_runs", [Fault.drop_after()])
    first_done = anyio.Event()

    async def inputs() -> AsyncIterator[str]:
        yield "a"
        await first_done.wait()
        yield "b"

    got: list[Any] = []
    async with make_client(fake_server) as client:
        reads = RECONCILE_READ_ATTEMPTS * client.retry_policy.attempts
        fake_parallel.faults.script("group_runs", [Fault.status(500)] * reads)
        async with client.map(inputs(), processor="lite") as outcomes:
            with anyio.fail_after(20):
                async for o in outcomes:
                    got.append(o)
                    first_done.set()
    assert sorted(o.input or "" for o in got) == ["a", "b"] and all(o.ok for o in got)


async def test_an_event_that_beats_its_unresolved_add_is_matched_by_tag(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    # "a" keeps the group (and its stream) active. The add of "b" loses its answer and cannot
    # be reconciled, while "b" finishes at once: its event arrives (and the cursor moves past
    # it) before the add gives up. The tracker must still match it by tag.
    fake_parallel.plan = lambda body: RunPlan(duration=None if body["input"] == "a" else 0.0)
    fake_parallel.faults.script("group_add_runs", [Fault.ok(), Fault.drop_after()])
    b_done = anyio.Event()
    got: list[Any] = []
    async with make_client(fake_server, 4) as client:
        reads = RECONCILE_READ_ATTEMPTS * client.retry_policy.attempts

        async def inputs() -> AsyncIterator[str]:
            yield "a"
            await wait_until(lambda: fake_parallel.stats.streams_open >= 1)
            fake_parallel.faults.script("group_runs", [Fault.status(500)] * reads)
            yield "b"
            await b_done.wait()
            yield "c"

        async with client.map(inputs(), processor="lite") as outcomes:
            with anyio.fail_after(20):
                async for o in outcomes:
                    got.append(o)
                    if o.input == "b":
                        b_done.set()
                    if o.input == "c":  # now let "a" finish too
                        for run_id, run in fake_parallel.runs.items():
                            if run.input["input"] == "a":
                                fake_parallel.complete(run_id)
    assert [o.input for o in got] == ["b", "c", "a"]
    assert all(o.ok for o in got)
    assert fake_parallel.stats.runs_created == 3


async def test_progress_counts_runs_by_state_while_they_run(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    # Every run is running for as long as the test wants: progress must say so (before the
    # ledger it showed "in flight 0" and fired once before the first completion).
    from parallel_async import Progress

    fake_parallel.manual = True
    seen: list[Progress] = []
    n = 5
    async with make_client(fake_server) as client:
        async with client.map(
            [f"x{i}" for i in range(n)], processor="lite", progress=seen.append
        ) as outcomes:
            await wait_until(lambda: bool(seen) and seen[-1].running == n)
            assert seen[-1].queued == 0 and seen[-1].done == 0 and seen[-1].created == n
            for run_id in list(fake_parallel.runs):
                fake_parallel.complete(run_id)
            got = [o async for o in outcomes]
    assert len(got) == n and all(o.ok for o in got)
    last = seen[-1]
    assert (last.completed, last.running, last.queued) == (n, 0, 0)

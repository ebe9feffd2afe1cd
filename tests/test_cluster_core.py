"""The engine-neutral core of Spark/Dask enrichment, without an engine: the coordinator (budget,
partition owners), a task attempt's adopt-then-create against the fake server, the Arrow
pipe, and the Spark driver's coordinator service over real HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from cluster_server import LocalLink, most_in_window
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel_async import AsyncParallel, ClusterError, FieldSpecError, InvalidArgumentError
from parallel_async._cluster import ClusterPlan, partition_job, plan_job
from parallel_async._cluster_limit import Coordinator
from parallel_async._cluster_service import CoordinatorService, HttpLink
from parallel_async.testing import FakeParallel, FakeServer, Fault

FIELDS = "ceo, founded int, revenue float, public bool, tags list[str]"


def make_plan(columns: list[str], **kwargs: Any) -> ClusterPlan:
    options: dict[str, Any] = {
        "output": FIELDS,
        "processor": "lite",
        "columns": None,
        "key": None,
        "timeout": None,
        "create_rate_limit": 2000,
        "create_rate_window": 60.0,
        "create_rate_unit": "requests",
        "reconcile_settle": 0.5,
        "max_in_flight": 16,
    }
    options.update(kwargs)
    return plan_job(columns, **options)[1]


def rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"company": f"company {i}", "n": i} for i in range(start, start + n)]


# --- the coordinator ----------------------------------------------------------------------------


def test_budget_counts_requests_and_says_how_long_to_wait() -> None:
    c = Coordinator(3, 10.0, "requests", 0.0)
    c.begin(0, "a", 0.0)
    assert [c.acquire(0, "a", 1000, t)[0] for t in (0.0, 1.0, 2.0)] == ["granted"] * 3
    state, wait, _ = c.acquire(0, "a", 1, 3.0)
    assert state == "wait"
    assert wait == pytest.approx(0.0 + 10.5 - 3.0)  # the window, widened by 5 %
    assert c.acquire(0, "a", 1, 10.5)[0] == "granted"
    assert c.stats["requests"] == 4
    assert c.stats["runs"] == 3001


def test_budget_counts_runs() -> None:
    c = Coordinator(200, 5.0, "runs", 0.0)
    c.begin(0, "a", 0.0)
    c.begin(1, "b", 0.0)
    assert c.acquire(0, "a", 150, 0.0)[0] == "granted"
    assert c.acquire(1, "b", 50, 0.1)[0] == "granted"
    state, wait, _ = c.acquire(1, "b", 1, 0.2)
    assert state == "wait"
    assert wait == pytest.approx(5.25 - 0.2)
    assert c.acquire(1, "b", 150, 5.25)[0] == "granted"  # the first 150 left the window
    assert c.acquire(0, "a", 1, 5.3)[0] == "wait"


def test_a_429_pauses_every_partition() -> None:
    c = Coordinator(100, 60.0, "requests", 0.0)
    c.begin(0, "a", 0.0)
    c.begin(1, "b", 0.0)
    c.pause(2.0, 1.0)
    state, wait, _ = c.acquire(0, "a", 1, 1.5)
    assert state == "wait"
    assert wait == pytest.approx(1.5)
    assert c.acquire(1, "b", 1, 2.9)[0] == "wait"
    assert c.acquire(1, "b", 1, 3.0)[0] == "granted"


def test_a_new_attempt_supersedes_the_old_and_waits_for_its_open_creates() -> None:
    c = Coordinator(100, 60.0, "requests", 10.0)
    assert c.begin(0, "first", 0.0) == 0.0
    _, _, answered = c.acquire(0, "first", 10, 1.0)
    _, _, lost = c.acquire(0, "first", 10, 2.0)
    c.release(0, "first", [answered])  # the second add's answer never came
    assert c.begin(0, "second", 3.0) == pytest.approx(2.0 + 10.0 - 3.0)
    assert c.acquire(0, "first", 1, 4.0)[0] == "superseded"
    # a third attempt still waits for the first one's open create, not just the second's
    assert c.begin(0, "third", 5.0) == pytest.approx(12.0 - 5.0)
    assert c.begin(0, "fourth", 20.0) == 0.0
    assert c.stats["superseded"] == 1
    assert lost != answered


def test_answered_creates_cost_a_new_attempt_no_wait() -> None:
    c = Coordinator(100, 60.0, "requests", 60.0)
    c.begin(3, "a", 0.0)
    _, _, grant = c.acquire(3, "a", 5, 0.0)
    c.release(3, "a", [grant])
    assert c.begin(3, "b", 1.0) == 0.0


@settings(max_examples=60, deadline=None)
@given(
    limit=st.integers(1, 20),
    unit=st.sampled_from(["requests", "runs"]),
    asks=st.lists(
        st.tuples(st.floats(0, 2.0), st.integers(1, 30), st.integers(0, 2)), max_size=120
    ),
)
def test_grants_never_exceed_the_limit_in_any_window(
    limit: int, unit: Any, asks: list[tuple[float, int, int]]
) -> None:
    window = 1.0
    c = Coordinator(limit, window, unit, 0.0)
    for partition in range(3):
        c.begin(partition, f"t{partition}", 0.0)
    now = 0.0
    times: list[float] = []
    costs: list[int] = []
    for step, runs, partition in asks:
        now += step
        state, wait, _ = c.acquire(partition, f"t{partition}", runs, now)
        if state == "granted":
            times.append(now)
            costs.append(min(runs, limit) if unit == "runs" else 1)
        else:
            assert state == "wait"
            assert wait > 0
            # waiting exactly as told is enough (unless another grant came first)
            assert c.acquire(partition, f"t{partition}", runs, now + wait)[0] == "granted"
            times.append(now + wait)
            costs.append(min(runs, limit) if unit == "runs" else 1)
            now += wait
    assert most_in_window(times, window, costs) <= limit


# --- the driver's checks ------------------------------------------------------------------------


def test_bad_arguments_fail_before_anything_is_sent() -> None:
    columns = ["company", "n"]
    with pytest.raises(FieldSpecError):
        make_plan(columns, output="ceo int int")
    with pytest.raises(InvalidArgumentError, match="already has column"):
        make_plan(["company", "ceo"])
    with pytest.raises(InvalidArgumentError, match="no column"):
        make_plan(columns, key="id")
    with pytest.raises(InvalidArgumentError, match="create_rate_unit"):
        make_plan(columns, create_rate_unit="bytes")
    with pytest.raises(InvalidArgumentError, match="create_rate_limit"):
        make_plan(columns, create_rate_limit=0)
    with pytest.raises(InvalidArgumentError, match="reconcile_settle"):
        make_plan(columns, reconcile_settle=-1)
    with pytest.raises(InvalidArgumentError, match="processor"):
        make_plan(columns, processor="")
    assert make_plan(columns, create_rate_unit="runs", create_rate_limit=200).chunk == 200
    assert make_plan(columns).chunk == 1000


# --- a task attempt against the fake server -----------------------------------------------------


@pytest.fixture
def env(fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    """Workers read the key and base URL from the environment: point it at the fake."""
    monkeypatch.setenv("PARALLEL_API_KEY", "test-key")
    monkeypatch.setenv("PARALLEL_BASE_URL", fake_server.url)
    return fake_server


async def with_groups(server: FakeServer, plan: ClusterPlan, count: int) -> ClusterPlan:
    async with AsyncParallel(api_key="test-key", base_url=server.url) as client:
        groups = [(await client.task_group.create()).taskgroup_id for _ in range(count)]
    return msgspec.structs.replace(plan, groups=tuple(groups))


async def attempt(
    plan: ClusterPlan, partition: int, link: LocalLink, records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    async with partition_job(plan, partition, link) as start:
        return list(await start(records))


@pytest.mark.anyio
async def test_a_task_run_again_adopts_its_runs(
    env: FakeServer, fake_parallel: FakeParallel
) -> None:
    plan = await with_groups(env, make_plan(["company", "n"]), 2)
    link = LocalLink(Coordinator(2000, 60.0, "requests", 0.5))
    first = await attempt(plan, 0, link, rows(30))
    second = await attempt(plan, 1, link, rows(20, 30))
    assert fake_parallel.stats.runs_created == 50
    assert [r["_status"] for r in first + second] == ["completed"] * 50
    assert all(isinstance(r["founded"], int) and isinstance(r["tags"], list) for r in first)
    again = await attempt(plan, 0, link, rows(30))  # the engine ran the task again
    assert fake_parallel.stats.runs_created == 50
    assert [r["_run_id"] for r in again] == [r["_run_id"] for r in first]
    assert again == first
    assert link.coordinator.stats["attempts"] == 3


@pytest.mark.anyio
async def test_partitions_sharing_a_group_adopt_only_their_own_runs(
    env: FakeServer, fake_parallel: FakeParallel
) -> None:
    plan = await with_groups(env, make_plan(["company", "n"]), 1)  # one group for both
    link = LocalLink(Coordinator(2000, 60.0, "requests", 0.5))
    first = await attempt(plan, 0, link, rows(10))
    other = await attempt(plan, 1, link, rows(10))  # the same rows in another partition
    assert fake_parallel.stats.runs_created == 20
    assert {r["_run_id"] for r in first}.isdisjoint(r["_run_id"] for r in other)
    again = await attempt(plan, 1, link, rows(10))
    assert [r["_run_id"] for r in again] == [r["_run_id"] for r in other]
    assert fake_parallel.stats.runs_created == 20
    assert fake_parallel.stats.requests["result"] == 20  # finished answers come with the list
    parts = {r.input["metadata"]["pa_part"] for r in fake_parallel.runs.values()}
    assert parts == {0, 1}


@pytest.mark.anyio
async def test_an_attempt_killed_after_its_creates_is_taken_over(
    env: FakeServer, fake_parallel: FakeParallel
) -> None:
    fake_parallel.manual = True  # runs stay running until completed below
    plan = await with_groups(env, make_plan(["company", "n"]), 1)
    link = LocalLink(Coordinator(2000, 60.0, "requests", 0.5))
    async with partition_job(plan, 0, link) as start, start(rows(40)):
        with anyio.fail_after(30):
            while fake_parallel.stats.runs_created < 40:
                await anyio.sleep(0.01)
        # the attempt dies here, its runs still running
    assert fake_parallel.stats.runs_created == 40
    for run_id in list(fake_parallel.runs)[:10]:
        fake_parallel.complete(run_id)  # some finish before the task is run again
    fake_parallel.manual = False
    fake_parallel.duration = 0.05
    async with partition_job(plan, 0, link) as start:
        async with start(rows(40)) as out:
            for run_id in list(fake_parallel.runs)[10:]:
                fake_parallel.complete(run_id)
            done = [r async for r in out]
    assert fake_parallel.stats.runs_created == 40
    assert [r["n"] for r in done] == list(range(40))
    assert {r["_status"] for r in done} == {"completed"}
    assert len({r["_run_id"] for r in done}) == 40


@pytest.mark.anyio
async def test_rows_left_running_at_the_timeout_are_picked_up_next_time(
    env: FakeServer, fake_parallel: FakeParallel
) -> None:
    fake_parallel.manual = True  # runs never end by themselves: the timeout always comes
    # long enough for the adds to be answered on a loaded machine (a partial batch lingers
    # 0.2 s before it is sent); the attempt then waits out the rest of it
    plan = await with_groups(env, make_plan(["company", "n"], timeout=2.0), 1)
    link = LocalLink(Coordinator(2000, 60.0, "requests", 0.5))
    first = await attempt(plan, 0, link, rows(8))
    assert {r["_status"] for r in first} == {"running"}
    assert all(r["_run_id"] for r in first)
    for run_id in list(fake_parallel.runs):
        fake_parallel.complete(run_id)
    again = await attempt(plan, 0, link, rows(8))
    assert {r["_status"] for r in again} == {"completed"}
    assert [r["_run_id"] for r in again] == [r["_run_id"] for r in first]
    assert fake_parallel.stats.runs_created == 8


@pytest.mark.anyio
async def test_a_superseded_attempt_creates_nothing_more(
    env: FakeServer, fake_parallel: FakeParallel
) -> None:
    plan = await with_groups(env, make_plan(["company", "n"]), 1)
    coordinator = Coordinator(2000, 60.0, "requests", 0.0)
    link = LocalLink(coordinator)
    with pytest.raises(ClusterError, match="newer attempt"):
        async with partition_job(plan, 0, link) as start:
            coordinator.begin(0, "a newer attempt", time.monotonic())
            await start(rows(5))
    assert fake_parallel.stats.runs_created == 0


@pytest.mark.anyio
async def test_runs_unit_splits_adds_to_the_limit(
    env: FakeServer, fake_parallel: FakeParallel
) -> None:
    plan = await with_groups(
        env, make_plan(["company", "n"], create_rate_unit="runs", create_rate_limit=40), 1
    )
    coordinator = Coordinator(40, 1.0, "runs", 0.5)
    done = await attempt(plan, 0, LocalLink(coordinator), rows(100))
    assert fake_parallel.stats.runs_created == 100
    assert fake_parallel.stats.requests["group_add_runs"] >= 3  # no request over 40 runs
    assert coordinator.stats["runs"] == 100
    times = [r.created_at for r in fake_parallel.runs.values()]
    assert most_in_window(times, 1.0) <= 40
    assert {r["_status"] for r in done} == {"completed"}


@pytest.mark.anyio
async def test_a_429_pauses_the_whole_job(
    env: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    plan = await with_groups(env, make_plan(["company", "n"]), 1)
    coordinator = Coordinator(2000, 60.0, "requests", 0.5)
    fake_parallel.faults.script("group_add_runs", [Fault.status(429, retry_after="0")])
    done = await attempt(plan, 0, LocalLink(coordinator), rows(10))
    assert coordinator.stats["pauses"] == 1
    assert fake_parallel.stats.runs_created == 10
    assert {r["_status"] for r in done} == {"completed"}


@pytest.mark.anyio
async def test_failed_runs_are_adopted_not_created_again(
    env: FakeServer, fake_parallel: FakeParallel
) -> None:
    from parallel_async.testing import RunPlan

    fake_parallel.plan = lambda body: RunPlan(outcome="failed", error_message="no sources")
    plan = await with_groups(env, make_plan(["company", "n"]), 1)
    link = LocalLink(Coordinator(2000, 60.0, "requests", 0.5))
    first = await attempt(plan, 0, link, rows(5))
    again = await attempt(plan, 0, link, rows(5))
    assert fake_parallel.stats.runs_created == 5
    assert {r["_status"] for r in first + again} == {"failed"}
    assert {r["_error"] for r in again} == {"no sources"}


# --- the Arrow pipe -----------------------------------------------------------------------------


def test_arrow_batches_come_back_with_typed_columns(
    env_sync: tuple[str, FakeParallel],
) -> None:
    pa = pytest.importorskip("pyarrow")
    from parallel_async._cluster_arrow import enrich_batches

    url, fake = env_sync
    plan = anyio.run(with_groups_url, url, make_plan(["company", "n"], output=FIELDS + ", extra"))
    link = LocalLink(Coordinator(2000, 60.0, "requests", 0.5))

    @asynccontextmanager
    async def open_link() -> AsyncIterator[LocalLink]:
        yield link

    table = pa.Table.from_pylist(rows(25))
    batches = table.to_batches(max_chunksize=7)
    out = list(enrich_batches(plan, 0, iter(batches), open_link))
    assert [b.num_rows for b in out] == [7, 7, 7, 4]
    result = pa.Table.from_batches(out)
    assert result.column_names == [
        "company", "n", "ceo", "founded", "revenue", "public", "tags", "extra",
        "_status", "_error", "_run_id",
    ]  # fmt: skip
    assert str(result.schema.field("founded").type) == "int64"
    assert str(result.schema.field("tags").type) == "list<element: string>"
    assert result.column("company").to_pylist() == [r["company"] for r in rows(25)]
    assert set(result.column("_status").to_pylist()) == {"completed"}
    assert fake.stats.runs_created == 25
    assert list(enrich_batches(plan, 0, iter([]), open_link)) == []


async def with_groups_url(url: str, plan: ClusterPlan) -> ClusterPlan:
    async with AsyncParallel(api_key="test-key", base_url=url) as client:
        group = (await client.task_group.create()).taskgroup_id
    return msgspec.structs.replace(plan, groups=(group,))


@pytest.fixture
def env_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FakeParallel]]:
    """The fake server on a thread of its own, for code that runs its own event loop."""
    fake = FakeParallel(api_key="test-key", duration=0.0, max_long_poll=0.05)
    with anyio.from_thread.start_blocking_portal() as portal:
        server = FakeServer(fake)
        portal.call(server.start)
        monkeypatch.setenv("PARALLEL_API_KEY", "test-key")
        monkeypatch.setenv("PARALLEL_BASE_URL", server.url)
        try:
            yield server.url, fake
        finally:
            portal.call(server.close)
            fake.close()


# --- the Spark driver's service -----------------------------------------------------------------


@pytest.mark.anyio
async def test_the_driver_service_answers_with_its_secret_only() -> None:
    service = CoordinatorService("127.0.0.1")
    try:
        job = service.register(Coordinator(1, 60.0, "requests", 0.0))
        async with HttpLink(service.url, service.secret, job) as link:
            assert await link.begin(4, "t") == 0.0
            state, _, grant = await link.acquire(4, "t", 1000)
            assert state == "granted"
            assert (await link.acquire(4, "t", 1))[0] == "wait"
            await link.release(4, "t", [grant])
            await link.pause(1.0)
        assert service.coordinator(job).stats["pauses"] == 1
        async with HttpLink(service.url, "wrong", job) as link:
            with pytest.raises(ClusterError, match="403"):
                await link.begin(4, "t")
        async with HttpLink(service.url, service.secret, "nojob") as link:
            with pytest.raises(ClusterError, match="404"):
                await link.begin(0, "t")
        assert service.secret not in repr(HttpLink(service.url, service.secret, job))
    finally:
        service.close()

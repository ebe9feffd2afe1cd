"""The fan-out engine against the fake server over real HTTP: nothing lost, nothing doubled."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

import anyio
import pytest

from parallel_async import (
    AsyncParallel,
    InvalidArgumentError,
    Outcome,
    Progress,
    RunFailedError,
    RunTimeoutError,
)
from parallel_async.testing import FakeParallel, FakeServer, RunPlan

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.anyio


async def wait_until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait for a server-side condition; fails only if it never holds."""
    with anyio.fail_after(limit):
        while not predicate():
            await anyio.sleep(0.005)


def make_client(server: FakeServer, width: int, **kwargs: Any) -> AsyncParallel:
    return AsyncParallel(
        api_key="test-key",
        base_url=server.url,
        max_in_flight=width,
        create_rate_limit=None,
        **kwargs,
    )


@pytest.mark.slow
async def test_ten_thousand_runs_through_map(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    n, width = 10_000, 64
    fake_parallel.plan = lambda body: RunPlan(duration=(hash(body["input"]) % 5) / 100)
    seen: Counter[int] = Counter()
    async with (
        make_client(fake_server, width) as client,
        client.map(
            (f"input {i}" for i in range(n)), processor="lite", timeout=600, strategy="poll"
        ) as outcomes,
    ):
        async for o in outcomes:
            assert o.ok, o.error
            assert o.input == f"input {o.index}"
            seen[o.index] += 1
    assert len(seen) == n and set(seen.values()) == {1}  # every input exactly one outcome
    assert fake_parallel.stats.runs_created == n  # no duplicate run created
    assert fake_parallel.stats.max_result_in_flight <= width


async def test_mixed_outcomes_are_reported_per_run(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    def plan(body: dict[str, Any]) -> RunPlan:
        kind = body["input"].split()[0]
        if kind == "fail":
            return RunPlan(duration=0.0, outcome="failed", error_message="boom")
        if kind == "slow":
            return RunPlan(duration=3600.0)
        return RunPlan(duration=0.0)

    fake_parallel.plan = plan
    inputs = [f"{kind} {i}" for i, kind in enumerate(["ok", "fail", "slow"] * 10)]
    results: dict[str, list[Outcome[str]]] = {"ok": [], "fail": [], "slow": []}
    # run_timeout ends the slow runs; the others (30 runs on 8 slots) must be fetched well
    # within it, which took over 1.5 s on a loaded machine
    async with make_client(fake_server, 8) as client:
        async with client.map(
            inputs, processor="base", run_timeout=3.0, strategy="poll"
        ) as outcomes:
            async for o in outcomes:
                assert o.input is not None
                results[o.input.split()[0]].append(o)
    assert all(o.ok and o.result is not None for o in results["ok"])
    assert all(isinstance(o.error, RunFailedError) for o in results["fail"])
    assert all(isinstance(o.error, RunTimeoutError) for o in results["slow"])
    assert sum(len(v) for v in results.values()) == 30
    assert all(o.run_id for v in results.values() for o in v)


async def test_short_runs_are_not_held_up_by_long_ones(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    # 20 runs that never finish on their own, 200 quick ones, only 8 slots: a design where an
    # unfinished run holds its slot would never deliver the quick ones (and time out here).
    fake_parallel.plan = lambda body: RunPlan(
        duration=None if body["input"].startswith("long") else 0.0
    )
    fake_parallel.manual = False
    inputs = [f"long {i}" for i in range(20)] + [f"short {i}" for i in range(200)]
    short_done = 0
    async with make_client(fake_server, 8) as client:
        async with client.map(inputs, processor="base", strategy="poll") as outcomes:
            with anyio.fail_after(60):
                async for o in outcomes:
                    assert o.ok
                    assert o.input is not None
                    if o.input.startswith("short"):
                        short_done += 1
                        if short_done == 200:
                            # every short run delivered while all long runs are still active
                            assert all(
                                r.status in {"queued", "running"}
                                for r in fake_parallel.runs.values()
                                if r.input["input"].startswith("long")
                            )
                            for run_id, r in list(fake_parallel.runs.items()):
                                if r.input["input"].startswith("long"):
                                    fake_parallel.complete(run_id)
                    else:
                        assert short_done == 200
    assert short_done == 200
    assert fake_parallel.stats.max_result_in_flight <= 8


async def test_rate_limiter_keeps_under_the_servers_limit(fake_server: FakeServer) -> None:
    # The server counts a create when it arrives, the client when it sends it: the client's
    # wider window leaves room for transit times that differ by up to 0.3 s (a loaded
    # machine), so only a limiter that lets a 16th create into a window gets a 429.
    fake = FakeParallel(api_key="test-key", create_rate_limit=(15, 0.3))
    async with (
        FakeServer(fake) as server,
        AsyncParallel(
            api_key="test-key",
            base_url=server.url,
            create_rate_limit=15,
            create_rate_window=0.6,
        ) as client,
    ):
        outcomes = []
        async with client.map(
            [f"x{i}" for i in range(45)], processor="lite", strategy="poll"
        ) as stream:
            outcomes = [o async for o in stream]
    assert len(outcomes) == 45 and all(o.ok for o in outcomes)
    assert fake.stats.rate_limited == 0
    assert fake.stats.runs_created == 45
    fake.close()


async def test_leaving_early_cancels_and_releases_everything(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    fake_parallel.plan = lambda body: RunPlan(duration=None if body["input"] != "quick" else 0.0)
    async with make_client(fake_server, 10) as client:
        inputs = ["quick"] + [f"stuck {i}" for i in range(40)]
        async with client.map(inputs, processor="base", strategy="poll") as outcomes:
            async for o in outcomes:
                assert o.input == "quick"
                await wait_until(lambda: fake_parallel.stats.result_in_flight >= 9)
                break
        slots = client._fanout_slots()
        assert slots.borrowed_tokens == 0
        # The server sees every held /result request go away promptly.
        await wait_until(lambda: fake_parallel.stats.result_in_flight == 0)
    await wait_until(lambda: fake_parallel.stats.open_connections == 0)


async def test_cancelling_the_consumer_releases_everything(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    fake_parallel.plan = lambda body: RunPlan(duration=None)
    async with make_client(fake_server, 10) as client:
        with anyio.move_on_after(0.5):
            async with client.map(
                [f"s{i}" for i in range(30)], processor="base", strategy="poll"
            ) as outcomes:
                async for _ in outcomes:
                    pass
        assert client._fanout_slots().borrowed_tokens == 0
        await wait_until(lambda: fake_parallel.stats.result_in_flight == 0)


async def test_fail_fast_raises_the_first_error_as_itself(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    fake_parallel.plan = lambda body: RunPlan(
        duration=0.0, outcome="failed" if body["input"] == "bad" else "completed"
    )
    async with make_client(fake_server, 4) as client:
        with pytest.raises(RunFailedError):
            async with client.map(
                ["ok", "bad", "ok"], processor="base", fail_fast=True, strategy="poll"
            ) as out:
                async for _ in out:
                    pass


async def test_consumer_errors_escape_unwrapped(fake_server: FakeServer) -> None:
    class Mine(Exception):
        pass

    async with make_client(fake_server, 4) as client:
        with pytest.raises(Mine):
            async with client.map(["a", "b"], processor="base", strategy="poll") as outcomes:
                async for _ in outcomes:
                    raise Mine


async def test_fan_out_deadline_turns_unfinished_runs_into_timeouts(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    fake_parallel.plan = lambda body: RunPlan(duration=None if body["input"] == "stuck" else 0.0)
    async with make_client(fake_server, 4) as client:
        runs = [await client.task_run.create(input=i, processor="base") for i in ["a", "stuck"]]
        got = await client.gather([r.run_id for r in runs], timeout=1.2)
    assert [o.run_id for o in got] == [r.run_id for r in runs]  # input order
    assert got[0].ok
    assert isinstance(got[1].error, RunTimeoutError)


async def test_bad_inputs_become_outcomes_and_bad_arguments_fail_at_once(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    async with make_client(fake_server, 4) as client:
        with pytest.raises(InvalidArgumentError, match="processor"):
            async with client.map(["a"], processor="", strategy="poll"):
                pass
        with pytest.raises(InvalidArgumentError, match="run_id"):
            async with client.as_completed(["trun_1", "../x"]):
                pass
        assert fake_parallel.stats.runs_created == 0
        async with client.map(["a", 3, "b"], processor="base", strategy="poll") as outcomes:
            got = sorted([o async for o in outcomes], key=lambda o: o.index)
    assert [o.ok for o in got] == [True, False, True]
    assert isinstance(got[1].error, InvalidArgumentError)
    assert fake_parallel.stats.runs_created == 2


async def test_progress_reports_consistent_counts(fake_server: FakeServer) -> None:
    snapshots: list[Progress] = []
    async with (
        make_client(fake_server, 4) as client,
        client.map(
            [f"i{i}" for i in range(20)],
            processor="base",
            progress=snapshots.append,
            strategy="poll",
        ) as outcomes,
    ):
        async for _ in outcomes:
            pass
    last = snapshots[-1]
    assert (last.total, last.created, last.completed, last.done) == (20, 20, 20, 20)
    assert last.eta == 0
    assert all(0 <= s.in_flight <= 4 for s in snapshots)


async def test_as_completed_yields_existing_runs(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    async with make_client(fake_server, 4) as client:
        runs = [await client.task_run.create(input=f"r{i}", processor="base") for i in range(10)]
        async with client.as_completed([r.run_id for r in runs], timeout=60) as outcomes:
            got = [o async for o in outcomes]
    assert sorted(o.index for o in got) == list(range(10))
    assert {o.run_id for o in got} == {r.run_id for r in runs}


async def test_long_polls_lengthen_as_the_backlog_shrinks(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    # 6 runs, 4 slots, poll_interval=1: 2 runs wait, so each slot hands over every
    # 4 * 1 / 2 = 2 s; once only 4 are left, every run has a slot and polls are long (no
    # needless 408s).
    fake_parallel.manual = True
    fake_parallel.max_long_poll = 0.02  # the server answers 408 fast; the asked timeout is kept
    timeouts = fake_parallel.stats.result_timeouts
    async with make_client(fake_server, 4) as client:
        ids = [
            (await client.task_run.create(input=f"q {i}", processor="lite")).run_id
            for i in range(6)
        ]
        async with client.as_completed(ids, poll_interval=1) as outcomes:
            await wait_until(lambda: timeouts[2] >= 8)
            assert set(timeouts) == {2}
            fake_parallel.complete(ids[0])
            fake_parallel.complete(ids[1])
            assert {(await outcomes.__anext__()).run_id for _ in range(2)} == set(ids[:2])
            await wait_until(lambda: timeouts[30] >= 8)
            for run_id in ids[2:]:
                fake_parallel.complete(run_id)
            rest = [o async for o in outcomes]
    assert sorted(o.run_id or "" for o in rest) == sorted(ids[2:])
    # 4 s while one run waited (after the first completion); never 1-s polls
    assert {2, 30} <= set(timeouts) <= {2, 4, 30}


Strategy = Literal["group", "poll"]
STRATEGIES = pytest.mark.parametrize("strategy", ["group", "poll"])


async def test_creates_waiting_for_the_rate_limit_hold_no_slot(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    # 2 slots, 2 creates per minute: the other inputs wait in the limiter for a minute, and
    # must do so without a slot, or the 2 created runs could never be polled.
    async with (
        AsyncParallel(
            api_key="test-key", base_url=fake_server.url, max_in_flight=2, create_rate_limit=2
        ) as client,
        client.map([f"i{i}" for i in range(6)], processor="lite", strategy="poll") as outcomes,
    ):
        with anyio.fail_after(10):
            got = [await outcomes.__anext__() for _ in range(2)]
    assert all(o.ok for o in got)
    assert fake_parallel.stats.runs_created == 2
    assert client._fanout_slots().borrowed_tokens == 0


async def test_run_timeout_starts_when_the_run_exists(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    # One create per second: the third run is created ~2 s after map starts, yet its 1-s
    # run_timeout is its own, not eaten by the wait for the limiter.
    async with (
        AsyncParallel(
            api_key="test-key",
            base_url=fake_server.url,
            max_in_flight=4,
            create_rate_limit=1,
            create_rate_window=1.0,
        ) as client,
        client.map(["a", "b", "c"], processor="lite", run_timeout=1.0, strategy="poll") as outcomes,
    ):
        got = [o async for o in outcomes]
    assert [o.ok for o in got] == [True, True, True], [o.error for o in got]


@STRATEGIES
async def test_a_raising_progress_callback_escapes_as_itself(
    fake_server: FakeServer, fake_parallel: FakeParallel, strategy: Strategy
) -> None:
    class Boom(Exception):
        pass

    calls = 0

    def progress(p: Progress) -> None:
        nonlocal calls
        calls += 1
        if p.done >= 3:
            raise Boom

    async with make_client(fake_server, 4) as client:
        with pytest.raises(Boom), anyio.fail_after(20):
            async with client.map(
                [f"i{i}" for i in range(50)], processor="lite", progress=progress, strategy=strategy
            ) as outcomes:
                async for _ in outcomes:
                    pass
        assert client._fanout_slots().borrowed_tokens == 0
        await wait_until(lambda: fake_parallel.stats.requests_in_flight == 0)
    assert calls >= 1


async def test_the_consumers_own_exception_group_escapes_unchanged(
    fake_server: FakeServer,
) -> None:
    mine = ExceptionGroup("mine", [ValueError("x")])
    async with make_client(fake_server, 4) as client:
        with pytest.raises(ExceptionGroup) as info:
            async with client.map(["a", "b"], processor="lite") as outcomes:
                async for _ in outcomes:
                    raise mine
    assert info.value is mine


@STRATEGIES
async def test_fail_fast_stops_the_fan_out_without_the_consumer(
    fake_server: FakeServer, fake_parallel: FakeParallel, strategy: Strategy
) -> None:
    # The consumer never iterates: fail_fast still ends the block with the first run error,
    # and stops creating.
    n = 1000
    fake_parallel.plan = lambda body: RunPlan(
        duration=0.0 if body["input"] == "bad" else None,
        outcome="failed" if body["input"] == "bad" else "completed",
    )
    inputs = ["bad"] + [f"ok {i}" for i in range(n - 1)]
    async with make_client(fake_server, 4) as client:
        with pytest.raises(RunFailedError), anyio.fail_after(20):
            async with client.map(inputs, processor="lite", fail_fast=True, strategy=strategy):
                await anyio.sleep_forever()
        assert client._fanout_slots().borrowed_tokens == 0
    if strategy == "poll":  # (the group strategy sends all 1,000 in its first request)
        assert fake_parallel.stats.runs_created < n


@STRATEGIES
async def test_a_failing_input_source_loses_no_created_run(
    fake_server: FakeServer, fake_parallel: FakeParallel, strategy: Strategy
) -> None:
    class SourceError(Exception):
        pass

    def inputs() -> Iterator[str]:
        yield from (f"i{i}" for i in range(30))
        raise SourceError

    got: list[Outcome[str]] = []
    async with make_client(fake_server, 4) as client:
        with pytest.raises(SourceError):
            async with client.map(inputs(), processor="lite", strategy=strategy) as outcomes:
                async for o in outcomes:
                    got.append(o)
    # every run created before the source failed was delivered first, then the error
    assert sorted(o.index for o in got) == list(range(30))
    assert all(o.ok for o in got)
    assert fake_parallel.stats.runs_created == 30


async def test_arguments_are_checked_at_once(fake_server: FakeServer) -> None:
    with pytest.raises(InvalidArgumentError, match="max_in_flight"):
        AsyncParallel(api_key="k", max_in_flight=True)
    with pytest.raises(InvalidArgumentError, match="create_rate_limit"):
        AsyncParallel(api_key="k", create_rate_limit=0)
    async with make_client(fake_server, 4) as client:
        for bad in (5, None):
            with pytest.raises(InvalidArgumentError, match="iterable"):
                async with client.map(bad, processor="lite"):  # type: ignore[call-overload]
                    pass


@STRATEGIES
async def test_every_request_of_a_fan_out_stays_within_the_bound(
    fake_server: FakeServer, fake_parallel: FakeParallel, strategy: Strategy
) -> None:
    # Counted on the server across every endpoint (creates, group adds, /result, status
    # reads, the group's event stream).
    width, n = 8, 2000
    fake_parallel.plan = lambda body: RunPlan(
        duration=(hash(body["input"]) % 4) / 100,
        outcome="failed" if body["input"].endswith("7") else "completed",
    )
    seen: Counter[int] = Counter()
    async with (
        make_client(fake_server, width) as client,
        client.map([f"i{i}" for i in range(n)], processor="lite", strategy=strategy) as outcomes,
    ):
        async for o in outcomes:
            seen[o.index] += 1
            assert o.ok != o.input.endswith("7")  # type: ignore[union-attr]
    assert len(seen) == n and set(seen.values()) == {1}
    assert fake_parallel.stats.runs_created == n
    # the group strategy adds its event stream and one add_runs request beside the slots
    extra = 2 if strategy == "group" else 0
    assert fake_parallel.stats.max_requests_in_flight <= width + extra


@STRATEGIES
async def test_leaving_early_releases_every_request(
    fake_server: FakeServer, fake_parallel: FakeParallel, strategy: Strategy
) -> None:
    fake_parallel.plan = lambda body: RunPlan(duration=None if body["input"] != "quick" else 0.0)
    async with make_client(fake_server, 10) as client:
        inputs = ["quick"] + [f"stuck {i}" for i in range(40)]
        async with client.map(inputs, processor="base", strategy=strategy) as outcomes:
            async for o in outcomes:
                assert o.input == "quick"
                await wait_until(lambda: fake_parallel.stats.requests_in_flight >= 1)
                break
        assert client._fanout_slots().borrowed_tokens == 0
        # while the client is still open, the server sees every request and stream go away
        await wait_until(lambda: fake_parallel.stats.requests_in_flight == 0)

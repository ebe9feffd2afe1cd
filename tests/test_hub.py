"""The result hub: every ``result()`` on a client shares one tracker (against the fake server).

A spy inside the fake server counts the ``/result`` requests open per run; the fake's own stats
count requests and connections. Runs are driven with the fake's completion controls.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from aiohttp import web
from local_server import serve_app

from parallel_async import (
    AsyncParallel,
    ClientClosedError,
    DecodeError,
    RunCancelledError,
    RunFailedError,
    RunTimeoutError,
    TaskRunResult,
    _hub_workers,
)
from parallel_async._errors import LedgerError, TransportTimeoutError
from parallel_async._hub import ResultHub, _fresh
from parallel_async.testing import FakeParallel, FakeServer

pytestmark = pytest.mark.anyio

API_KEY = "test-key"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SpyFake(FakeParallel):
    """The fake, with a spy counting ``/result`` requests per run (open now, most at once)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.result_open: Counter[str] = Counter()
        self.max_result_open: Counter[str] = Counter()
        self.result_requests: Counter[str] = Counter()
        self.result_cut: Counter[str] = Counter()  # ended by the client hanging up

    def make_app(self) -> web.Application:
        app = super().make_app()

        @web.middleware
        async def spy(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not request.path.endswith("/result"):
                return await handler(request)
            run_id = request.match_info["run_id"]
            self.result_requests[run_id] += 1
            self.result_open[run_id] += 1
            self.max_result_open[run_id] = max(
                self.max_result_open[run_id], self.result_open[run_id]
            )
            try:
                return await handler(request)
            except asyncio.CancelledError:
                self.result_cut[run_id] += 1
                raise
            finally:
                self.result_open[run_id] -= 1

        app.middlewares.append(spy)
        return app

    def new_runs(self, n: int) -> list[str]:
        """``n`` runs created server-side (no request counted)."""
        return [self.store.create({"input": "x", "processor": "lite"}).run_id for _ in range(n)]


@pytest.fixture
async def spy_env() -> AsyncIterator[tuple[SpyFake, FakeServer]]:
    fake = SpyFake(api_key=API_KEY, manual=True)
    try:
        async with FakeServer(fake) as server:
            loop = asyncio.get_running_loop()
            errors: list[dict[str, Any]] = []
            loop.set_exception_handler(lambda _loop, context: errors.append(context))
            yield fake, server
            assert errors == [], errors  # never an unhandled task exception
    finally:
        fake.close()


@pytest.fixture
def long_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs' first long-polls hold 30 s (no slow start), as they do once runs are old."""
    monkeypatch.setattr(_hub_workers, "FIRST_POLL", 30)


def _client(server: FakeServer, **kwargs: Any) -> AsyncParallel:
    return AsyncParallel(api_key=API_KEY, base_url=server.url, **kwargs)


async def wait_until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait for a condition (fails only if it never holds within ``limit``)."""
    with anyio.fail_after(limit):
        while not predicate():
            await anyio.sleep(0.002)


async def settle(n: int = 20) -> None:
    """Let callbacks and just-woken tasks run (loop iterations, not time)."""
    for _ in range(n):
        await anyio.lowlevel.checkpoint()


# --- sharing ------------------------------------------------------------------------------------


async def test_waiters_of_one_run_share_one_request_at_a_time(
    spy_env: tuple[SpyFake, FakeServer],
) -> None:
    fake, server = spy_env
    fake.max_long_poll = 0.05  # quick 408s: many polls, each must be the only one open
    (run_id,) = fake.new_runs(1)
    got: list[TaskRunResult] = []
    async with _client(server, max_in_flight=50) as client:

        async def waiter() -> None:
            got.append(await client.task_run.result(run_id))

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(waiter)
            await wait_until(lambda: fake.stats.statuses[408] >= 5)
            assert client._result_hub().waiters == 200
            fake.complete(run_id)
        assert client._result_hub().waiters == 0
        await wait_until(lambda: client._result_hub().workers == 0)
    assert len(got) == 200 and all(r.run.run_id == run_id for r in got)
    assert len({id(r) for r in got}) == 1  # one answer, handed to every waiter
    assert fake.max_result_open[run_id] == 1
    assert fake.stats.requests["result"] == fake.stats.statuses[408] + 1


@pytest.mark.usefixtures("long_polls")
async def test_a_cancelled_waiter_leaves_the_others_and_the_last_frees_the_slot(
    spy_env: tuple[SpyFake, FakeServer],
) -> None:
    fake, server = spy_env
    (run_id,) = fake.new_runs(1)
    async with _client(server, max_in_flight=4) as client:
        hub = client._result_hub()
        scopes = [anyio.CancelScope() for _ in range(3)]
        got: list[TaskRunResult] = []

        async def waiter(scope: anyio.CancelScope) -> None:
            with scope:
                got.append(await client.task_run.result(run_id))

        async with anyio.create_task_group() as tg:
            for scope in scopes:
                tg.start_soon(waiter, scope)
            await wait_until(lambda: fake.result_open[run_id] == 1)  # one 30 s long-poll
            scopes[0].cancel()  # a handler's client disconnected
            await settle()
            assert hub.waiters == 2
            assert fake.result_open[run_id] == 1 and fake.result_requests[run_id] == 1
            scopes[1].cancel()
            scopes[2].cancel()
            # The last one leaving cuts the long-poll at once: the slot and the server's
            # request are freed now, not when the 30 s wait ends.
            await wait_until(lambda: client._fanout_slots().borrowed_tokens == 0, limit=20)
            await wait_until(lambda: fake.result_open[run_id] == 0, limit=20)
            assert fake.result_cut[run_id] == 1  # cut by the client, not answered
        assert got == [] and hub.waiters == 0
        await wait_until(lambda: hub.workers == 0)
        # The run goes on; a new waiter starts afresh.
        fake.complete(run_id)
        assert (await client.task_run.result(run_id)).run.run_id == run_id


@pytest.mark.usefixtures("long_polls")
async def test_waiter_timeouts_are_independent(spy_env: tuple[SpyFake, FakeServer]) -> None:
    fake, server = spy_env
    (run_id,) = fake.new_runs(1)
    async with _client(server) as client:
        got: list[TaskRunResult] = []

        async def patient() -> None:
            got.append(await client.task_run.result(run_id, timeout=None))

        async with anyio.create_task_group() as tg:
            tg.start_soon(patient)
            await wait_until(lambda: fake.result_open[run_id] == 1)  # its 30 s long-poll
            with pytest.raises(RunTimeoutError) as info:
                await client.task_run.result(run_id, timeout=0.3)
            assert info.value.run_id == run_id and info.value.timeout == 0.3
            # the other waiter's long-poll was neither cut nor repeated
            assert fake.result_open[run_id] == 1 and fake.result_requests[run_id] == 1
            fake.complete(run_id)
        assert [r.run.run_id for r in got] == [run_id]
        assert fake.result_requests[run_id] == 1


async def test_a_timed_out_waiter_reports_the_last_status(
    spy_env: tuple[SpyFake, FakeServer],
) -> None:
    fake, server = spy_env
    fake.max_long_poll = 0.05
    (run_id,) = fake.new_runs(1)
    async with _client(server) as client:
        hub = client._result_hub()

        def status_known() -> bool:
            return any(run.entry.status == "running" for run in hub._runs.values())

        async with anyio.create_task_group() as tg:
            tg.start_soon(client.task_run.result, run_id)  # polls: 408, then reads the status
            # wait for the client to have read the status, not for the server to send it
            await wait_until(status_known)
            with pytest.raises(RunTimeoutError) as info:
                await client.task_run.result(run_id, timeout=0.05)
            fake.complete(run_id)
    assert info.value.last_status == "running"  # read once after the first 408
    assert fake.stats.requests["retrieve"] == 1


async def test_different_betas_are_different_entries(
    spy_env: tuple[SpyFake, FakeServer],
) -> None:
    fake, server = spy_env
    (run_id,) = fake.new_runs(1)
    async with _client(server) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.task_run.result, run_id)
            tg.start_soon(lambda: client.task_run.result(run_id, betas=["webhook-2025-08-12"]))
            await wait_until(lambda: fake.result_open[run_id] == 2)
            fake.complete(run_id)


async def test_long_polls_start_short_and_grow(spy_env: tuple[SpyFake, FakeServer]) -> None:
    fake, server = spy_env
    (run_id,) = fake.new_runs(1)
    async with _client(server) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.task_run.result, run_id)
            await wait_until(lambda: fake.stats.result_timeouts[2] == 1)  # after one 1 s 408
            fake.complete(run_id)
    assert fake.stats.result_timeouts == {1: 1, 2: 1}
    assert fake.stats.requests["retrieve"] == 1  # its status, read once (a 408 has none)


async def test_errors_reach_every_waiter_as_their_own_exception(
    spy_env: tuple[SpyFake, FakeServer],
) -> None:
    fake, server = spy_env
    failed, cancelled = fake.new_runs(2)
    async with _client(server) as client:
        errors: list[BaseException] = []

        async def waiter(run_id: str) -> None:
            try:
                await client.task_run.result(run_id)
            except (RunFailedError, RunCancelledError) as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for run_id in (failed, failed, cancelled, cancelled):
                tg.start_soon(waiter, run_id)
            await wait_until(lambda: fake.result_open[failed] + fake.result_open[cancelled] == 2)
            fake.fail(failed, "no sources")
            fake.cancel(cancelled)
    kinds = Counter(type(e).__name__ for e in errors)
    assert kinds == {"RunFailedError": 2, "RunCancelledError": 2}
    assert len({id(e) for e in errors}) == 4
    messages = [e.error.message for e in errors if isinstance(e, RunFailedError) and e.error]
    assert messages == ["no sources", "no sources"]


async def test_a_body_that_does_not_decode_is_a_decode_error_for_each_waiter() -> None:
    async def result(request: web.Request) -> web.Response:
        return web.Response(body=b"not json", content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/tasks/runs/{run_id}/result", result)
    async with serve_app(app) as url, AsyncParallel(api_key="k", base_url=url) as client:
        outcomes = []

        async def waiter() -> None:
            try:
                await client.task_run.result("trun_1")
            except DecodeError as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(waiter)
    assert len(outcomes) == 2 and outcomes[0].body == b"not json"


# --- fairness -----------------------------------------------------------------------------------


async def test_500_waiters_on_50_slots_fast_runs_first(
    spy_env: tuple[SpyFake, FakeServer],
) -> None:
    fake, server = spy_env
    runs = fake.new_runs(500)
    slow, fast = runs[:100], runs[100:]
    got: Counter[str] = Counter()
    async with _client(server, max_in_flight=50) as client:

        async def handler(run_id: str) -> None:
            result = await client.task_run.result(run_id)
            got[result.run.run_id] += 1

        async with anyio.create_task_group() as tg:
            for run_id in runs:
                tg.start_soon(handler, run_id)
            await wait_until(lambda: client._result_hub().waiters == 500)
            for run_id in fast:
                fake.complete(run_id)
            # every fast run is delivered while every slow one is still going
            await wait_until(lambda: sum(got.values()) == 400, limit=30)
            assert set(got) == set(fast)
            assert all(fake.runs[r].status == "running" for r in slow)
            for run_id in slow:
                fake.complete(run_id)
        assert client._fanout_slots().borrowed_tokens == 0
    assert got == Counter(runs)  # every waiter its own result, once
    assert fake.stats.max_requests_in_flight <= 50
    assert fake.stats.max_open_connections <= 52
    assert max(fake.max_result_open.values()) == 1


@pytest.mark.usefixtures("long_polls")
async def test_a_new_waiter_is_not_stuck_behind_long_polls(
    spy_env: tuple[SpyFake, FakeServer],
) -> None:
    # Two slots, both held by 30 s long-polls of slow runs: a third waiter's completed run
    # is delivered after about a second (one long-poll cut), not after 30 s.
    fake, server = spy_env
    slow_a, slow_b, quick = fake.new_runs(3)
    fake.complete(quick)
    async with _client(server, max_in_flight=2) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.task_run.result, slow_a)
            tg.start_soon(client.task_run.result, slow_b)
            await wait_until(lambda: fake.result_open[slow_a] + fake.result_open[slow_b] == 2)
            with anyio.fail_after(20):  # well under the 30 s a long-poll holds its slot
                result = await client.task_run.result(quick)
            assert result.run.run_id == quick
            # the client hung up one long-poll; the server sees it a moment later
            await wait_until(lambda: fake.result_cut[slow_a] + fake.result_cut[slow_b] >= 1)
            assert fake.result_cut[slow_a] + fake.result_cut[slow_b] == 1  # one cut, requeued
            fake.complete(slow_a)
            fake.complete(slow_b)
    assert fake.stats.max_requests_in_flight <= 2


async def test_hub_polls_share_the_slots_with_a_fan_out(
    spy_env: tuple[SpyFake, FakeServer],
) -> None:
    fake, server = spy_env
    fake.max_long_poll = 0.05
    mapped = fake.new_runs(20)
    awaited = fake.new_runs(20)
    async with _client(server, max_in_flight=8) as client:
        got: list[str] = []

        async def handler(run_id: str) -> None:
            got.append((await client.task_run.result(run_id)).run.run_id)

        async with anyio.create_task_group() as tg:
            for run_id in awaited:
                tg.start_soon(handler, run_id)

            async def fan_out() -> None:
                async with client.as_completed(mapped) as outcomes:
                    got.extend([o.run_id async for o in outcomes if o.run_id])

            tg.start_soon(fan_out)
            await wait_until(lambda: fake.stats.statuses[408] >= 40)
            for run_id in mapped + awaited:
                fake.complete(run_id)
    assert sorted(got) == sorted(mapped + awaited)
    assert fake.stats.max_requests_in_flight <= 8


# --- lifecycle ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("long_polls")
async def test_closing_the_client_ends_every_waiter(spy_env: tuple[SpyFake, FakeServer]) -> None:
    fake, server = spy_env
    runs = fake.new_runs(3)
    errors: list[BaseException] = []
    client = _client(server, max_in_flight=2)
    async with client:
        hub = client._result_hub()

        async def waiter(run_id: str) -> None:
            try:
                await client.task_run.result(run_id)
            except ClientClosedError as exc:
                errors.append(exc)

        with anyio.fail_after(20):  # promptly: not when the 30 s long-polls end
            async with anyio.create_task_group() as tg:
                for run_id in runs * 2:
                    tg.start_soon(waiter, run_id)
                await wait_until(lambda: sum(fake.result_open.values()) == 2)
                await client.aclose()
    assert len(errors) == 6 and all("closed" in str(e) for e in errors)
    assert hub.workers == 0 and hub.waiters == 0
    with pytest.raises(ClientClosedError):
        await client.task_run.result(runs[0])
    await wait_until(lambda: sum(fake.result_open.values()) == 0)


# --- facts from outside -------------------------------------------------------------------------


async def _waiting(hub: ResultHub, n: int) -> None:
    await wait_until(lambda: hub.waiters == n)
    await settle()


async def test_a_followed_run_is_not_polled_and_fetched_once_observed(
    spy_env: tuple[SpyFake, FakeServer],
) -> None:
    fake, server = spy_env
    (run_id,) = fake.new_runs(1)
    async with _client(server) as client:
        hub = client._result_hub()
        hub.follow([run_id])
        got: list[TaskRunResult] = []

        async def waiter() -> None:
            got.append(await client.task_run.result(run_id))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(waiter)
            await _waiting(hub, 2)
            assert hub.workers == 0 and sum(fake.stats.requests.values()) == 0
            hub.observe(await client.task_run.retrieve(run_id))  # still running: nothing
            await settle()
            assert fake.stats.requests["result"] == 0
            fake.complete(run_id)
            hub.observe(await client.task_run.retrieve(run_id))
        assert len(got) == 2
        assert fake.stats.requests["result"] == 1  # one fetch, for both waiters
        hub.unfollow([run_id])


async def test_an_observed_failure_ends_the_waiters_without_a_request(
    spy_env: tuple[SpyFake, FakeServer],
) -> None:
    fake, server = spy_env
    (run_id,) = fake.new_runs(1)
    async with _client(server) as client:
        hub = client._result_hub()
        hub.follow([run_id])
        fake.fail(run_id, "boom")
        failed = await client.task_run.retrieve(run_id)
        fake.stats.reset()
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                with pytest.raises(RunFailedError, match="boom"):
                    await client.task_run.result(run_id)

            tg.start_soon(waiter)
            await _waiting(hub, 1)
            hub.observe(failed)
        assert sum(fake.stats.requests.values()) == 0


async def test_unfollowed_runs_are_polled_again(spy_env: tuple[SpyFake, FakeServer]) -> None:
    fake, server = spy_env
    (run_id,) = fake.new_runs(1)
    async with _client(server) as client:
        hub = client._result_hub()
        hub.follow([run_id])
        hub.follow([run_id])  # two streams cover it
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.task_run.result, run_id)
            await _waiting(hub, 1)
            hub.unfollow([run_id])
            await settle()
            assert fake.stats.requests["result"] == 0  # one stream still covers it
            hub.unfollow([run_id])
            await wait_until(lambda: fake.result_open[run_id] == 1)
            fake.complete(run_id)


@pytest.mark.usefixtures("long_polls")
async def test_following_a_polled_run_cuts_its_poll(spy_env: tuple[SpyFake, FakeServer]) -> None:
    fake, server = spy_env
    (run_id,) = fake.new_runs(1)
    async with _client(server) as client:
        hub = client._result_hub()
        got: list[TaskRunResult] = []

        async def waiter() -> None:
            got.append(await client.task_run.result(run_id))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_until(lambda: fake.result_open[run_id] == 1)
            hub.follow([run_id])
            await wait_until(lambda: fake.result_open[run_id] == 0, limit=20)
            await wait_until(lambda: client._fanout_slots().borrowed_tokens == 0, limit=20)
            fake.complete(run_id)
            hub.observe(await client.task_run.retrieve(run_id))
        assert len(got) == 1
        assert fake.result_requests[run_id] == 2  # the cut poll, then one fetch
        assert fake.result_cut[run_id] == 1
        hub.unfollow([run_id])


@pytest.mark.usefixtures("long_polls")
async def test_an_observed_completion_preempts_a_long_poll(
    spy_env: tuple[SpyFake, FakeServer],
) -> None:
    # One slot, held by a slow run's long-poll: a result known to be ready does not wait
    # for it to end.
    fake, server = spy_env
    slow, ready = fake.new_runs(2)
    async with _client(server, max_in_flight=1) as client:
        hub = client._result_hub()
        hub.follow([ready])
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.task_run.result, slow)
            await wait_until(lambda: fake.result_open[slow] == 1)

            async def ready_waiter() -> None:
                with anyio.fail_after(20):  # not held up by the 30 s long-poll
                    assert (await client.task_run.result(ready)).run.run_id == ready

            tg.start_soon(ready_waiter)
            await _waiting(hub, 2)
            fake.complete(ready)
            hub.observe(await client.task_run.retrieve(ready))
            await wait_until(lambda: fake.result_requests[ready] == 1)
            # the slow run's long-poll was cut for it, then opened again
            await wait_until(
                lambda: (
                    fake.result_requests[slow] == 2
                    and fake.result_open[slow] == 1
                    and hub.waiters == 1
                )
            )
            assert fake.result_cut[slow] == 1
            fake.complete(slow)
        hub.unfollow([ready])


async def test_a_bug_in_a_worker_reaches_every_waiter_loudly(
    spy_env: tuple[SpyFake, FakeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection into the hub's own report step: the safety net, not a real path.
    fake, server = spy_env
    fake.max_long_poll = 0.05
    run_a, run_b = fake.new_runs(2)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected")

    async with _client(server) as client:
        with monkeypatch.context() as patch:
            patch.setattr(_hub_workers.Workers, "_report", broken)
            errors: list[BaseException] = []

            async def waiter(run_id: str) -> None:
                with pytest.raises(LedgerError, match="injected") as info:
                    await client.task_run.result(run_id)
                errors.append(info.value)

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for run_id in (run_a, run_a, run_b):
                        tg.start_soon(waiter, run_id)
        assert len(errors) == 3 and isinstance(errors[0].__cause__, RuntimeError)
        await wait_until(lambda: client._result_hub().workers == 0)
        fake.complete(run_a)
        assert (await client.task_run.result(run_a)).run.run_id == run_a  # works again


def test_a_waiters_copy_of_an_error_keeps_its_message() -> None:
    # RunTimeoutError is a TimeoutError, an OSError: its __new__ alone leaves args empty
    for error in (
        RunTimeoutError(run_id="trun_1", last_status="running", timeout=1.0),
        TransportTimeoutError("no answer in time for GET /x", method="GET", path="/x"),
        RunFailedError(run_id="trun_1", run=None, error=None),
    ):
        copy = _fresh(error)
        assert type(copy) is type(error)
        assert str(copy) == str(error) != ""
        assert copy.__dict__ == error.__dict__

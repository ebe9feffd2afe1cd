"""Every retry rule, against the fake server's fault injection over real HTTP."""

from __future__ import annotations

import email.utils
import time

import anyio
import pytest
from local_server import refused_port

from parallel_async import (
    AsyncParallel,
    ConnectError,
    DecodeError,
    DisconnectedError,
    InternalServerError,
    RateLimitError,
    RetryPolicy,
    RunTimeoutError,
    TransportTimeoutError,
)
from parallel_async.testing import FakeParallel, FakeServer, Fault

pytestmark = pytest.mark.anyio


async def test_429_honours_retry_after_seconds(
    client: AsyncParallel, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    fake_parallel.faults.script("create", [Fault.status(429, retry_after="7"), Fault.ok()])
    run = await client.task_run.create(input="x", processor="base")
    assert run.run_id
    assert no_sleep == [7.0]
    assert fake_parallel.stats.runs_created == 1


async def test_429_honours_retry_after_http_date(
    client: AsyncParallel, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    date = email.utils.formatdate(time.time() + 120, usegmt=True)
    fake_parallel.faults.script("create", [Fault.status(429, retry_after=date), Fault.ok()])
    await client.task_run.create(input="x", processor="base")
    assert len(no_sleep) == 1
    assert 115 <= no_sleep[0] <= 121  # no arbitrary 60 s cap


async def test_429_honours_retry_after_ms(
    client: AsyncParallel, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    fake_parallel.faults.script("retrieve", [Fault.status(429, retry_after_ms="250"), Fault.ok()])
    run = await client.task_run.create(input="x", processor="base")
    await client.task_run.retrieve(run.run_id)
    assert no_sleep == [0.25]


async def test_retry_after_beyond_the_deadline_fails_at_once(
    client: AsyncParallel, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    fake_parallel.manual = True
    run = await client.task_run.create(input="x", processor="base")
    fake_parallel.faults.script("result", [Fault.status(429, retry_after="30")])
    with pytest.raises(RateLimitError) as info:
        await client.task_run.result(run.run_id, timeout=5)
    assert info.value.retry_after == 30.0
    assert no_sleep == []  # gave up without waiting


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_gets_retry_5xx(
    client: AsyncParallel, fake_parallel: FakeParallel, no_sleep: list[float], status: int
) -> None:
    run = await client.task_run.create(input="x", processor="base")
    fake_parallel.faults.script("retrieve", [Fault.status(status), Fault.status(status)])
    got = await client.task_run.retrieve(run.run_id)
    assert got.run_id == run.run_id
    assert fake_parallel.stats.requests["retrieve"] == 3
    assert len(no_sleep) == 2
    assert no_sleep[1] > no_sleep[0] * 0.9  # exponential, with jitter


async def test_gets_retry_dropped_connections(
    client: AsyncParallel, fake_parallel: FakeParallel
) -> None:
    run = await client.task_run.create(input="x", processor="base")
    fake_parallel.faults.script("result", [Fault.drop(), Fault.drop()])
    result = await client.task_run.result(run.run_id)
    assert result.run.run_id == run.run_id


async def test_create_retries_503_answered_before_processing(
    client: AsyncParallel, fake_parallel: FakeParallel
) -> None:
    fake_parallel.faults.script("create", [Fault.status(503), Fault.status(503)])
    await client.task_run.create(input="x", processor="base")
    assert fake_parallel.stats.runs_created == 1
    assert fake_parallel.stats.requests["create"] == 3


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_create_is_not_retried_after_an_ambiguous_5xx(
    client: AsyncParallel, fake_parallel: FakeParallel, status: int
) -> None:
    fake_parallel.faults.script("create", [Fault.status(status)])
    with pytest.raises(InternalServerError) as info:
        await client.task_run.create(input="x", processor="base")
    assert info.value.status == status
    assert fake_parallel.stats.requests["create"] == 1


async def test_create_is_not_retried_when_the_connection_drops_after_processing(
    client: AsyncParallel, fake_parallel: FakeParallel
) -> None:
    fake_parallel.faults.script("create", [Fault.drop_after()])
    with pytest.raises(DisconnectedError):
        await client.task_run.create(input="x", processor="base")
    # The server made the run; we did not make a second one behind the user's back.
    assert fake_parallel.stats.runs_created == 1
    assert fake_parallel.stats.requests["create"] == 1


async def test_create_is_not_retried_when_the_connection_drops(
    client: AsyncParallel, fake_parallel: FakeParallel
) -> None:
    fake_parallel.faults.script("create", [Fault.drop()])
    with pytest.raises(DisconnectedError):
        await client.task_run.create(input="x", processor="base")
    assert fake_parallel.stats.requests["create"] == 1


async def test_connection_refused_is_retried_even_for_create(no_sleep: list[float]) -> None:
    policy = RetryPolicy(attempts=4)
    with refused_port() as port:
        url = f"http://127.0.0.1:{port}"
        async with AsyncParallel(api_key="k", base_url=url, retry=policy) as client:
            with pytest.raises(ConnectError) as info:
                await client.task_run.create(input="x", processor="base")
    assert len(no_sleep) == 3  # 4 attempts, 3 waits
    assert info.value.method == "POST"


async def test_retries_are_bounded_by_total_time(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    policy = RetryPolicy(attempts=50, timeout=5.0, initial_backoff=1.0, max_backoff=1.0, jitter=0)
    fake_parallel.faults.probabilities("retrieve", {Fault.status(503): 1.0})
    async with AsyncParallel(api_key="test-key", base_url=fake_server.url, retry=policy) as c:
        with pytest.raises(InternalServerError):
            await c.task_run.retrieve("trun_00000000000000000000000000000000")
    # With sleeping off, elapsed time stays ~0: the attempt bound is what stops it here...
    assert len(no_sleep) == 49
    # ...while with real sleeps the 5 s budget would end it: check the stop rule directly.
    from parallel_async._retry import _Stop

    class State:
        attempt_number = 3
        upcoming_sleep = 1.0
        seconds_since_start = 4.5

    assert _Stop(50, 5.0, None)(State())  # type: ignore[arg-type]


async def test_malformed_json_raises_decode_error_with_body(
    client: AsyncParallel, fake_parallel: FakeParallel
) -> None:
    run = await client.task_run.create(input="x", processor="base")
    fake_parallel.faults.script("retrieve", [Fault.malformed()])
    with pytest.raises(DecodeError) as info:
        await client.task_run.retrieve(run.run_id)
    assert info.value.status == 200
    assert info.value.body  # the raw bytes are kept


async def test_retries_do_not_extend_the_result_deadline(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    # Real backoff sleeps (no no_sleep fixture) and a server that always answers 503: the
    # policy alone would go on for minutes, the caller's 0.5 s deadline ends it.
    fake_parallel.manual = True
    async with AsyncParallel(api_key="test-key", base_url=fake_server.url) as client:
        run = await client.task_run.create(input="x", processor="base")
        fake_parallel.faults.probabilities("result", {Fault.status(503): 1.0})
        with anyio.fail_after(5), pytest.raises((RunTimeoutError, InternalServerError)):
            await client.task_run.result(run.run_id, timeout=0.5)


async def test_a_held_long_poll_is_cut_at_the_deadline(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    # The server would hold this /result for 30 s; the client's 0.5 s deadline cuts it.
    fake_parallel.manual = True
    fake_parallel.max_long_poll = None
    async with AsyncParallel(api_key="test-key", base_url=fake_server.url) as client:
        run = await client.task_run.create(input="x", processor="base")
        with anyio.fail_after(5), pytest.raises(RunTimeoutError):
            await client.task_run.result(run.run_id, api_timeout=30, timeout=0.5)
    assert fake_parallel.stats.requests["result"] == 1
    assert fake_parallel.stats.result_timeouts[1] == 1  # asked for what was left, in whole s


async def test_a_create_that_timed_out_reading_is_not_sent_again(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    # The body was sent and the answer never came in time: the run may exist, so the create
    # is surfaced, not repeated.
    fake_parallel.faults.script("create", [Fault.slow(5)])
    async with AsyncParallel(api_key="test-key", base_url=fake_server.url, timeout=0.3) as client:
        with anyio.fail_after(5), pytest.raises(TransportTimeoutError):
            await client.task_run.create(input="x", processor="base")
    assert fake_parallel.stats.requests["create"] == 1


async def test_a_bad_minute_of_the_server_does_not_end_a_healthy_result(
    client: AsyncParallel, fake_parallel: FakeParallel
) -> None:
    run = await client.task_run.create(input="x", processor="base")
    # more 503s in a row than one request's retry policy allows
    fake_parallel.faults.script("result", [Fault.status(503)] * 8)
    result = await client.task_run.result(run.run_id, timeout=60)
    assert result.run.run_id == run.run_id

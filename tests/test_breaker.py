"""Failing fast: the circuit breaker against an unreachable API, and 429s that do not stack.

An unreachable API is a port nothing listens on (connection refused); `set_testing` turns
retry waits off, so the breakers here use ``after=0`` (no minimum outage span).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import pytest
from local_server import refused_port

from parallel_async import (
    APIUnreachableError,
    AsyncParallel,
    CircuitBreaker,
    ConnectError,
    RetryPolicy,
)
from parallel_async._limiter import CreateLimiter
from parallel_async._retry import is_retryable
from parallel_async.testing import FakeParallel, FakeServer, Fault, set_testing

pytestmark = pytest.mark.anyio

GUARD = 20.0


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that refuses connections (held for the whole test: no other server takes it)."""
    with refused_port() as port:
        yield port


def client_for(port: int, breaker: CircuitBreaker | None) -> AsyncParallel:
    return AsyncParallel(
        api_key="k",
        base_url=f"http://127.0.0.1:{port}",
        retry=RetryPolicy(circuit_breaker=breaker),
    )


def test_a_breaker_refusal_is_a_connect_error_never_retried() -> None:
    error = APIUnreachableError("x", method="GET", path="/v1/x")
    assert isinstance(error, ConnectError)
    assert not is_retryable(error, idempotent=True)
    with pytest.raises(ValueError, match="cooldown"):
        CircuitBreaker(cooldown=0)


async def test_consecutive_connect_failures_open_the_breaker_and_then_fail_fast(
    closed_port: int,
) -> None:
    breaker = CircuitBreaker(failures=3, after=0, cooldown=60)
    async with client_for(closed_port, breaker) as client:
        with set_testing() as sleeps, anyio.fail_after(GUARD):
            with pytest.raises(APIUnreachableError) as info:
                await client.task_run.retrieve("trun_1")  # the third attempt opens it
            assert isinstance(info.value.__cause__, ConnectError)
            assert len(sleeps) == 2
            with pytest.raises(APIUnreachableError, match="unreachable"):
                await client.task_run.create(input="x", processor="base")
            with pytest.raises(APIUnreachableError):
                async with await client.task_group.events("tgrp_1") as stream:
                    async for _ in stream:
                        pass
            assert len(sleeps) == 2  # failed at once: no attempt, no wait


async def test_without_a_breaker_every_request_spends_its_retries(closed_port: int) -> None:
    async with client_for(closed_port, None) as client:
        with set_testing() as sleeps, anyio.fail_after(GUARD):
            for _ in range(3):
                with pytest.raises(ConnectError) as info:
                    await client.task_run.retrieve("trun_1")
                assert not isinstance(info.value, APIUnreachableError)
    assert len(sleeps) == 3 * (RetryPolicy().attempts - 1)


async def test_after_the_cooldown_one_probe_goes_through_and_an_answer_closes_it(
    closed_port: int,
) -> None:
    port = closed_port
    # The cool-down must outlast starting the server below, even on a loaded machine.
    breaker = CircuitBreaker(failures=1, after=0, cooldown=1.0)
    fake = FakeParallel(api_key="k")
    async with client_for(port, breaker) as client:
        with set_testing(), anyio.fail_after(GUARD):
            with pytest.raises(APIUnreachableError):
                await client.task_group.create()
            opened = time.monotonic()  # the breaker opened before this
            async with FakeServer(fake, port=port):  # the API is back
                with pytest.raises(APIUnreachableError):  # still cooling down
                    await client.task_group.create()
                assert fake.stats.requests["group_create"] == 0  # refused without a request
                await anyio.sleep(max(0.0, opened + 1.05 - time.monotonic()))
                fake.faults.script("group_create", [Fault.slow(0.5)])
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.task_group.create)  # the probe, held by the server
                    while fake.stats.requests["group_create"] < 1:
                        await anyio.sleep(0.01)
                    with pytest.raises(APIUnreachableError):  # others fail while it probes
                        await client.task_group.create()
                group = await client.task_group.create()  # the probe answered: closed
    assert group.taskgroup_id


async def test_a_fan_out_against_an_unreachable_api_fails_fast(closed_port: int) -> None:
    breaker = CircuitBreaker(failures=5, after=0, cooldown=60)
    inputs = [f"q{i}" for i in range(200)]
    async with client_for(closed_port, breaker) as client:
        with set_testing() as sleeps, anyio.fail_after(GUARD):
            async with client.map(inputs, processor="base", strategy="poll") as outcomes:
                errors = [o.error async for o in outcomes]
    assert len(errors) == 200
    assert all(isinstance(e, ConnectError) for e in errors)
    assert sum(isinstance(e, APIUnreachableError) for e in errors) >= 190
    assert len(sleeps) < 50  # not 200 inputs x 5 retry waits


# --- 429s ----------------------------------------------------------------------------------------


def test_429s_within_a_window_pause_once_for_the_longest_wait() -> None:
    limiter = CreateLimiter(None, window=60.0)
    started = time.monotonic()
    limiter.pause(1.0)
    first = limiter.paused_until
    assert started + 1.0 <= first <= time.monotonic() + 1.0
    limiter.pause(1.0)  # the same burst: not pushed further
    assert limiter.paused_until == first
    limiter.pause(3.0)  # a longer wait asked: honoured once, from the pause's start
    assert limiter.paused_until == pytest.approx(first + 2.0)
    limiter.pause(0.5)
    assert limiter.paused_until == pytest.approx(first + 2.0)


async def test_a_429_after_the_pause_in_the_same_window_does_not_pause_again() -> None:
    limiter = CreateLimiter(None, window=60.0)
    limiter.pause(0.01)
    first = limiter.paused_until
    await anyio.sleep(0.05)  # past the pause, well within the window
    limiter.pause(0.01)
    assert limiter.paused_until == first < time.monotonic()
    with anyio.fail_after(GUARD):
        await limiter.acquire()  # no wait

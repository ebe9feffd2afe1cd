"""The client-wide create limiter: a sliding window, and 429s that pause every create."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from parallel_async import AsyncParallel, RunTimeoutError
from parallel_async._limiter import CreateLimiter
from parallel_async.testing import FakeParallel, FakeServer, Fault, RunPlan

pytestmark = pytest.mark.anyio


async def test_no_window_ever_holds_more_than_the_limit() -> None:
    limiter = CreateLimiter(3, window=0.2)
    stamps: list[float] = []

    async def take() -> None:
        await limiter.acquire()
        stamps.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        for _ in range(9):
            tg.start_soon(take)
    stamps.sort()
    assert len(stamps) == 9
    # any 4 consecutive admissions span more than one window
    assert all(stamps[i + 3] - stamps[i] >= 0.2 for i in range(len(stamps) - 3))


async def test_unlimited_admits_at_once() -> None:
    limiter = CreateLimiter(None)
    with anyio.fail_after(1):
        for _ in range(10_000):
            await limiter.acquire()


async def test_a_429_on_one_create_pauses_every_create(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    created_at: list[float] = []

    def plan(body: dict[str, Any]) -> RunPlan:
        created_at.append(time.monotonic())
        return RunPlan(duration=0.0)

    fake_parallel.plan = plan
    fake_parallel.faults.script("create", [Fault.status(429, retry_after="1")])
    async with AsyncParallel(
        api_key="test-key", base_url=fake_server.url, create_rate_limit=None
    ) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.task_run.create(input="first", processor="lite"))
            # wait for the client to have read the 429, not just for the server to send it
            limiter = client._create_limiter
            with anyio.fail_after(10):
                while limiter.paused_until <= time.monotonic():
                    await anyio.sleep(0.005)
            paused_until = limiter.paused_until
            # a second, independent create waits out the same pause
            tg.start_soon(lambda: client.task_run.create(input="second", processor="lite"))
    assert len(created_at) == 2
    # the second create waited out the pause the first one's 429 started
    assert min(created_at) >= paused_until - 0.01
    assert fake_parallel.stats.rate_limited == 1
    assert fake_parallel.stats.requests["create"] == 3  # the 429, then one each


async def test_a_limiter_wait_past_the_deadline_fails_at_once(
    fake_server: FakeServer, fake_parallel: FakeParallel
) -> None:
    async with AsyncParallel(
        api_key="test-key", base_url=fake_server.url, create_rate_limit=1, create_rate_window=30
    ) as client:
        await client.task_run.execute(input="first", processor="lite", timeout=10)
        with anyio.fail_after(5), pytest.raises(RunTimeoutError) as info:
            # the next create slot is ~30 s away: no point waiting 1 s to learn it
            await client.task_run.execute(input="second", processor="lite", timeout=1)
    assert info.value.run_id == ""
    assert "before this input's run was created" in str(info.value)
    assert fake_parallel.stats.runs_created == 1

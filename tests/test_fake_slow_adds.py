"""The fake's slow adds: ``group_store.add_delay`` / ``hold_adds`` and hang-ups, over real HTTP.

An accepted ``add_runs`` that takes time keeps going when the client hangs up, as on a real
server. No test sleeps a fixed time: held adds are released by the test, and waits poll the
fake's state under a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import pytest

from parallel_async.testing import FakeParallel, FakeServer, Fault

pytestmark = pytest.mark.anyio

HEADERS = {"x-api-key": "test-key"}


async def until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.005)


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[FakeParallel, str, aiohttp.ClientSession]]:
    fake = FakeParallel(api_key="test-key", manual=True)
    try:
        async with FakeServer(fake) as server, aiohttp.ClientSession(headers=HEADERS) as session:
            async with session.post(server.url + "/v1/tasks/groups", json={}) as resp:
                group_id = (await resp.json())["taskgroup_id"]
            yield fake, f"{server.url}/v1/tasks/groups/{group_id}/runs", session
    finally:
        fake.close()


def inputs(n: int) -> dict[str, Any]:
    return {"inputs": [{"input": f"q{i}", "processor": "lite"} for i in range(n)]}


async def test_a_held_add_answers_once_released() -> None:
    async with serving() as (fake, url, session):
        fake.group_store.hold_adds()

        async def post() -> dict[str, Any]:
            async with session.post(url, json=inputs(3)) as resp:
                assert resp.status == 200
                body: dict[str, Any] = await resp.json()
                return body

        task = asyncio.ensure_future(post())
        await until(lambda: fake.group_store.adds_pending == 1)
        assert fake.stats.runs_created == 0 and not task.done()
        fake.group_store.release_adds()
        body = await task
        assert len(body["run_ids"]) == 3 and fake.stats.runs_created == 3
        assert fake.group_store.adds_pending == 0 and not fake.group_store.slow_adds


async def test_a_client_hanging_up_does_not_stop_a_slow_add() -> None:
    async with serving() as (fake, url, session):
        fake.group_store.hold_adds()
        task = asyncio.ensure_future(session.post(url, json=inputs(4)))
        await until(lambda: fake.group_store.adds_pending == 1)
        task.cancel()  # the client gives up, as on a read timeout
        with pytest.raises(asyncio.CancelledError):
            await task
        fake.group_store.release_adds()
        await until(lambda: fake.stats.runs_created == 4)
        group = next(iter(fake.groups.values()))
        assert group.num_runs == 4


async def test_drop_after_on_a_slow_add_hangs_up_before_the_runs_exist() -> None:
    async with serving() as (fake, url, session):
        fake.group_store.hold_adds()
        fake.faults.script("group_add_runs", [Fault.drop_after()])
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.post(url, json=inputs(2))
        assert fake.stats.dropped == 1 and fake.stats.runs_created == 0
        assert fake.group_store.adds_pending == 1
        assert sum(fake.stats.statuses.values()) == 1  # only the group create was answered
        fake.group_store.release_adds()
        await until(lambda: fake.stats.runs_created == 2)


async def test_hold_counts_and_delay() -> None:
    async with serving() as (fake, url, session):
        fake.group_store.hold_adds(count=1)
        held = asyncio.ensure_future(session.post(url, json=inputs(1)))
        await until(lambda: fake.group_store.adds_pending == 1)
        async with session.post(url, json=inputs(2)) as resp:  # the hold took one add only
            assert resp.status == 200
        assert fake.stats.runs_created == 2
        fake.group_store.release_adds()
        async with await held as resp:
            assert resp.status == 200
        fake.group_store.add_delay = 0.01
        async with session.post(url, json=inputs(1)) as resp:
            assert resp.status == 200
        assert fake.stats.runs_created == 4
        with pytest.raises(ValueError, match="count"):
            fake.group_store.hold_adds(count=-1)


async def test_close_cancels_held_adds() -> None:
    async with serving() as (fake, url, session):
        fake.group_store.hold_adds()
        fake.faults.script("group_add_runs", [Fault.drop_after()])
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.post(url, json=inputs(2))
        assert fake.group_store.adds_pending == 1
        fake.group_store.close()
        await until(lambda: fake.group_store.adds_pending == 0)
        assert fake.stats.runs_created == 0

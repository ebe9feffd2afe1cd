"""A client never has more than ``max_in_flight + 2`` connections open at the server.

The fake server counts TCP connections from accept to close (``Stats.max_open_connections``),
so a connection the client has let go of but whose socket is not closed yet still counts, as
it does for a real server. Runs are driven with the fake's completion controls; every wait is
for a state, never for time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from aiohttp import web
from local_server import serve_app

from parallel_async import AsyncParallel, TransportTimeoutError, _hub_workers
from parallel_async.testing import FakeParallel, FakeServer

pytestmark = pytest.mark.anyio

API_KEY = "test-key"
SECRET = "test-webhook-secret"
FAST = (0.01, 0.02, 0.04)


class CutCounting(FakeParallel):
    """The fake, counting the ``/result`` requests the client hung up on (cut long-polls)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cut: Counter[str] = Counter()

    def make_app(self) -> web.Application:
        app = super().make_app()

        @web.middleware
        async def spy(request: web.Request, handler: Any) -> web.StreamResponse:
            try:
                response: web.StreamResponse = await handler(request)
            except asyncio.CancelledError:
                if request.path.endswith("/result"):
                    self.cut[request.match_info["run_id"]] += 1
                raise
            return response

        app.middlewares.append(spy)
        return app

    def new_runs(self, n: int) -> list[str]:
        """``n`` runs created server-side (no request counted)."""
        return [self.store.create({"input": "x", "processor": "lite"}).run_id for _ in range(n)]


@dataclass
class Setup:
    fake: CutCounting
    client: AsyncParallel
    hook: str  # the webhook URL of the client's receiver


@asynccontextmanager
async def webhook_client(width: int) -> AsyncIterator[Setup]:
    """The fake server, a client of ``width`` slots, and its webhook receiver (aiohttp.web)."""
    fake = CutCounting(api_key=API_KEY, manual=True, webhook_retry_delays=FAST)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        async with FakeServer(fake) as server:
            client = AsyncParallel(
                api_key=API_KEY, base_url=server.url, max_in_flight=width, webhook_secret=SECRET
            )
            async with client:
                app = web.Application()
                app.router.add_post("/hooks", client.webhooks.aiohttp_handler())
                async with serve_app(app) as base:
                    yield Setup(fake, client, f"{base}/hooks")
    finally:
        fake.close()
    assert errors == [], errors  # never an unhandled task exception


async def wait_until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait for a condition (fails only if it never holds within ``limit``)."""
    with anyio.fail_after(limit):
        while not predicate():
            await anyio.sleep(0.002)


@pytest.fixture
def long_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long-polls hold 30 s from the first (no slow start): only a cut frees their slots."""
    monkeypatch.setattr(_hub_workers, "FIRST_POLL", 30)


@pytest.mark.usefixtures("long_polls")
async def test_webhook_fetches_preempting_long_polls_stay_within_the_bound() -> None:
    # Every slot is held by a long-poll of a slow run and two event streams (outside the
    # slots, as a web app relaying progress would open) take the pool's two spare
    # connections: the server sees max_in_flight + 2. Then 20 runs awaited by 60 handlers
    # finish and their webhooks arrive: each fetch cuts a long-poll to get a slot. A cut
    # connection's socket closes a loop turn after the request lets go of it; its
    # replacement must not be opened before, or the server sees one connection too many.
    width = 4
    async with webhook_client(width) as s:
        fake, client = s.fake, s.client
        hooked = [
            (await client.task_run.create(input=f"h{i}", processor="lite", webhook={"url": s.hook}))
            for i in range(20)
        ]
        slow = fake.new_runs(width)
        got: dict[int, list[str]] = {}

        async def waiter(index: int, run_id: str) -> None:
            result = await client.task_run.result(run_id, timeout=60)
            got.setdefault(index, []).append(result.run.run_id)

        async def follow(run_id: str) -> None:
            async for _ in await client.task_run.events(run_id):
                pass

        wanted = [run.run_id for run in hooked for _ in range(3)] + slow
        async with anyio.create_task_group() as tg:
            for index, run_id in enumerate(wanted):
                tg.start_soon(waiter, index, run_id)
            for run_id in slow[:2]:
                tg.start_soon(follow, run_id)
            # width long-polls and the two streams open (the webhook runs are not polled)
            await wait_until(lambda: fake.stats.requests_in_flight == width + 2)
            assert fake.stats.open_connections == width + 2
            for run in hooked:
                fake.complete(run.run_id)  # its webhook wakes its waiters: a fetch each
            await wait_until(lambda: len(got) == 3 * len(hooked))
            # fetches did preempt long-polls (the server notices a hang-up a moment later)
            await wait_until(lambda: sum(fake.cut.values()) >= 1)
            for run_id in slow:
                fake.complete(run_id)
    assert sorted(got) == list(range(len(wanted)))  # every waiter got its result...
    assert all(got[i] == [run_id] for i, run_id in enumerate(wanted))  # ...its own, once
    assert all(fake.stats.result_requests_by_run[r.run_id] == 1 for r in hooked)
    assert fake.stats.max_open_connections <= width + 2


async def settle(n: int = 20) -> None:
    """Let callbacks and just-woken tasks run (loop iterations, not time)."""
    for _ in range(n):
        await anyio.lowlevel.checkpoint()


@pytest.mark.usefixtures("long_polls")
async def test_a_request_queued_for_a_connection_waits_for_a_cut_one_to_close() -> None:
    # The hub's long-polls hold every slot, two streams the spare connections, and a request
    # outside the slots (a status read) queues for a connection. A handler leaves: its
    # long-poll is cut and the queued request takes the place, once the cut socket is closed.
    # (aiohttp's own pool used to wake such a request before closing the socket; the fake,
    # in this process, happens to read that close before the new connection, so this test
    # pins the queue's behaviour rather than that old overlap.)
    width = 2
    async with webhook_client(width) as s:
        fake, client = s.fake, s.client
        runs = fake.new_runs(4)
        polled, streamed = runs[:width], runs[width:]

        async def follow(run_id: str) -> None:
            async for _ in await client.task_run.events(run_id):
                pass

        read: list[str] = []

        async def status(run_id: str) -> None:
            read.append((await client.task_run.retrieve(run_id)).run_id)

        leaving = anyio.CancelScope()

        async def leaver() -> None:
            with leaving:
                await client.task_run.result(polled[0])

        async with anyio.create_task_group() as tg:
            tg.start_soon(leaver)
            tg.start_soon(client.task_run.result, polled[1])
            for run_id in streamed:
                tg.start_soon(follow, run_id)
            await wait_until(lambda: fake.stats.requests_in_flight == width + 2)
            tg.start_soon(status, polled[0])
            await settle()  # it is queued for a connection: none is free
            assert read == [] and fake.stats.requests_in_flight == width + 2
            leaving.cancel()  # the first handler's client went away: its long-poll is cut
            await wait_until(lambda: read == [polled[0]])
            await wait_until(lambda: fake.cut[polled[0]] >= 1)  # the server saw the hang-up
            assert fake.cut[polled[0]] == 1
            for run_id in runs:
                fake.complete(run_id)
    assert fake.stats.max_open_connections <= width + 2


async def test_waiting_for_a_connection_counts_toward_the_attempts_bound() -> None:
    # Three streams hold every connection of a one-slot client: a request waits for one
    # only as long as its attempt may take (read + connect timeout), then it is a
    # TransportTimeoutError; the streams are untouched.
    fake = CutCounting(api_key=API_KEY, manual=True)
    try:
        async with FakeServer(fake) as server:
            runs = fake.new_runs(3)
            client = AsyncParallel(
                api_key=API_KEY,
                base_url=server.url,
                max_in_flight=1,
                timeout=0.2,
                # the streams' connections must not time out connecting on a loaded machine
                connect_timeout=1.0,
                max_retries=0,
            )
            async with client, anyio.create_task_group() as tg:

                async def follow(run_id: str) -> None:
                    stream = await client.task_run.events(run_id)
                    async for _ in stream:
                        pass

                for run_id in runs:
                    tg.start_soon(follow, run_id)
                await wait_until(lambda: fake.stats.requests_in_flight == 3)
                with pytest.raises(TransportTimeoutError, match="no connection free in time"):
                    await client.task_run.retrieve(runs[0])
                assert fake.stats.requests_in_flight == 3 and fake.stats.requests["retrieve"] == 0
                for run_id in runs:
                    fake.complete(run_id)
    finally:
        fake.close()
    assert fake.stats.max_open_connections <= 3

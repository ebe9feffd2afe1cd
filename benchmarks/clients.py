"""The four client loops under test. Each awaits every run in ``run_ids`` and, per run that
completed, appends ``(result.run.modified_at, time.time() when the result was delivered)``
to ``deliveries``; it returns how many runs did *not* complete. Imports are lazy so each
benchmark child process loads only the libraries of the client it measures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

# Server-side long-poll for the loops that hold a connection per run (seconds). Runs finish
# within a few seconds, so a held poll normally ends with the run's result, not a 408.
API_TIMEOUT = 30
# Whole-benchmark safety net for each client, seconds.
DEADLINE = 600.0

Deliveries = list[tuple[str | None, float]]
ClientFn = Callable[[str, str, list[str], int, Deliveries], Coroutine[Any, Any, int]]


class _Run(msgspec.Struct):
    run_id: str
    status: str
    modified_at: str


class _Result(msgspec.Struct):
    """The hand-written loop's view of a ``TaskRunResult``: the run and the raw output object."""

    run: _Run
    output: dict[str, Any]


async def parallel_async_client(
    base_url: str, api_key: str, run_ids: list[str], width: int, deliveries: Deliveries
) -> int:
    """parallel-async: ``as_completed`` over the pre-created runs, ``max_in_flight=width``."""
    from parallel_async import AsyncParallel

    failed = 0
    now = time.time
    async with (
        AsyncParallel(
            api_key=api_key, base_url=base_url, max_in_flight=width, create_rate_limit=None
        ) as client,
        client.as_completed(run_ids, timeout=DEADLINE) as outcomes,
    ):
        async for o in outcomes:
            if o.result is not None:
                deliveries.append((o.result.run.modified_at, now()))
            else:
                failed += 1
    return failed


async def _sdk_await_one(client: Any, run_id: str, deliveries: Deliveries) -> bool:
    """One run through the official SDK: ``task_run.result`` re-issued on 408."""
    import parallel

    while True:
        try:
            result = await client.task_run.result(run_id, api_timeout=API_TIMEOUT)
        except parallel.APIStatusError as exc:
            if exc.status_code == 408:
                continue
            return False
        deliveries.append((result.run.modified_at, time.time()))
        return True


async def sdk_defaults_client(
    base_url: str, api_key: str, run_ids: list[str], width: int, deliveries: Deliveries
) -> int:
    """The official SDK as documented: default client (httpx, pool of 100), one gather."""
    import parallel

    del width  # the defaults are the point: no pool sizing, no concurrency bound
    async with parallel.AsyncParallel(api_key=api_key, base_url=base_url) as client:
        done = await asyncio.gather(*(_sdk_await_one(client, r, deliveries) for r in run_ids))
    return done.count(False)


async def sdk_fast_client(
    base_url: str, api_key: str, run_ids: list[str], width: int, deliveries: Deliveries
) -> int:
    """The official SDK at its fastest: aiohttp transport, pool = width, semaphore = width."""
    import httpx
    import parallel

    http_client = parallel.DefaultAioHttpClient(
        limits=httpx.Limits(max_connections=width, max_keepalive_connections=width)
    )
    sem = asyncio.Semaphore(width)

    async def one(run_id: str) -> bool:
        async with sem:
            return await _sdk_await_one(client, run_id, deliveries)

    async with parallel.AsyncParallel(
        api_key=api_key, base_url=base_url, http_client=http_client
    ) as client:
        done = await asyncio.gather(*(one(r) for r in run_ids))
    return done.count(False)


async def aiohttp_loop_client(
    base_url: str, api_key: str, run_ids: list[str], width: int, deliveries: Deliveries
) -> int:
    """The baseline: one aiohttp session, a semaphore, ``GET /result`` looped on 408, msgspec."""
    import aiohttp

    decode = msgspec.json.Decoder(_Result).decode
    sem = asyncio.Semaphore(width)
    headers = {"x-api-key": api_key, "Accept": "application/json"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=API_TIMEOUT + 30)
    connector = aiohttp.TCPConnector(limit=width)

    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:

        async def one(run_id: str) -> bool:
            url = f"{base_url}/v1/tasks/runs/{run_id}/result?timeout={API_TIMEOUT}"
            async with sem:
                while True:
                    async with session.get(url) as resp:
                        body = await resp.read()
                    if resp.status == 200:
                        result = decode(body)
                        deliveries.append((result.run.modified_at, time.time()))
                        return True
                    if resp.status != 408:
                        return False

        done = await asyncio.gather(*(one(r) for r in run_ids))
    return done.count(False)


CLIENTS: dict[str, ClientFn] = {
    "parallel-async": parallel_async_client,
    "sdk-defaults": sdk_defaults_client,
    "sdk-fast": sdk_fast_client,
    "aiohttp-loop": aiohttp_loop_client,
}
BASELINE = "aiohttp-loop"
DESCRIPTIONS = {
    "parallel-async": "parallel-async `as_completed`, max_in_flight=width",
    "sdk-defaults": "official SDK, defaults (httpx, pool 100), asyncio.gather",
    "sdk-fast": "official SDK, DefaultAioHttpClient, pool=width, semaphore=width",
    "aiohttp-loop": "hand-written aiohttp + msgspec loop, semaphore=width (baseline)",
}

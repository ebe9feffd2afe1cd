"""The benchmark's fake server (run as its own process) and the harness's calls to it.

``python benchmarks/server.py --port 0`` serves a manual-mode ``FakeParallel``: runs stay
``running`` until the harness schedules their completion through ``POST /_bench/schedule``
(``{"run_ids": [...], "delays": [...]}``, seconds from now). That lets the harness create
runs before a measurement starts and still have them finish *during* it, at seeded times
spread over a few seconds, so delivery lag (client receive time minus the run's
``modified_at``) is meaningful. ``GET /_bench/stats`` returns the fake's request counters.

The process prints ``URL <base url>`` on stdout once listening and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from parallel_async.testing import FakeParallel, FakeServer

API_KEY = "bench-key"
_HEADERS = {"x-api-key": API_KEY, "Content-Type": "application/json"}


class _Schedule(msgspec.Struct):
    run_ids: list[str]
    delays: list[float]


class BenchFake(FakeParallel):
    """A manual-mode fake with two extra routes for the harness."""

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.router.add_post("/_bench/schedule", self._schedule)
        app.router.add_get("/_bench/stats", self._stats, allow_head=False)
        return app

    async def _schedule(self, request: web.Request) -> web.Response:
        plan = msgspec.json.decode(await request.read(), type=_Schedule)
        loop = asyncio.get_running_loop()
        for run_id, delay in zip(plan.run_ids, plan.delays, strict=True):
            loop.call_later(delay, self._complete_quietly, run_id)
        return web.json_response({"scheduled": len(plan.run_ids)})

    def _complete_quietly(self, run_id: str) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.complete(run_id)

    async def _stats(self, request: web.Request) -> web.Response:
        stats = self.stats
        return web.json_response(
            {
                "requests": dict(stats.requests),
                "statuses": {str(k): v for k, v in stats.statuses.items()},
                "max_open_connections": stats.max_open_connections,
                "connections_total": stats.connections_total,
            }
        )


async def _serve(host: str, port: int) -> None:
    fake = BenchFake(api_key=API_KEY, manual=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with FakeServer(fake, host, port, shutdown_timeout=0.5) as server:
        print(f"URL {server.url}", flush=True)
        await stop.wait()
    fake.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port))


# --- harness side -------------------------------------------------------------------------------


async def create_runs(base_url: str, n: int, *, concurrency: int = 64) -> list[str]:
    """Create ``n`` runs with plain aiohttp and return their ids (in creation order)."""
    body = msgspec.json.encode({"input": "benchmark input", "processor": "lite"})
    ids: list[str] = [""] * n
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=_HEADERS) as session:

        async def one(i: int) -> None:
            async with sem, session.post(f"{base_url}/v1/tasks/runs", data=body) as resp:
                payload = await resp.read()
                if resp.status != 202:
                    raise RuntimeError(f"create failed: HTTP {resp.status}: {payload[:200]!r}")
                ids[i] = msgspec.json.decode(payload)["run_id"]

        await asyncio.gather(*(one(i) for i in range(n)))
    return ids


async def schedule(base_url: str, run_ids: Sequence[str], delays: Sequence[float]) -> None:
    """Have the server complete each run ``delays[i]`` seconds from now."""
    payload = msgspec.json.encode({"run_ids": list(run_ids), "delays": list(delays)})
    async with (
        aiohttp.ClientSession(headers=_HEADERS) as session,
        session.post(f"{base_url}/_bench/schedule", data=payload) as resp,
    ):
        resp.raise_for_status()


async def server_stats(base_url: str) -> dict[str, Any]:
    """The server's request counters (cumulative since it started)."""
    async with (
        aiohttp.ClientSession(headers=_HEADERS) as session,
        session.get(f"{base_url}/_bench/stats") as resp,
    ):
        resp.raise_for_status()
        stats: dict[str, Any] = await resp.json()
        return stats


if __name__ == "__main__":
    main()

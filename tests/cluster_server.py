"""The fake Parallel server as a process of its own, for the Spark and Dask tests and benchmark.

    python tests/cluster_server.py [--duration S] [--rate N:W]

prints ``URL`` on its first line of stdout, then serves until stdin closes (so it never outlives
the test that started it). Besides the API it answers:

* ``GET /_test/stats``: what the server saw (runs created, create requests and their times, runs
  per row key per group, 429s), for assertions measured at the server;
* ``POST /_test/control``: ``{"duration": S}`` sets the run duration of runs created next,
  ``{"rate": [N, W]}`` sets the server's own create limit (``null``: none), ``{"add_delay":
  S}`` makes each accepted add take ``S`` seconds before its runs exist (even if the client
  hangs up, as a real server would).

`ClusterServer` starts and stops it from a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from typing import Any

from aiohttp import web

from parallel_async._cluster_limit import Coordinator, Grant
from parallel_async.testing import FakeParallel, FakeServer
from parallel_async.testing._ratelimit import SlidingWindow

API_KEY = "cluster-test-key"


class _StatsFake(FakeParallel):
    """A fake that also serves ``/_test/...`` and stamps each accepted create request."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.create_requests: list[tuple[float, int]] = []  # (time, runs) of accepted adds

    def make_app(self) -> web.Application:
        app = super().make_app()

        @web.middleware
        async def stamp(request: web.Request, handler: Any) -> web.StreamResponse:
            before = self.stats.runs_created
            response: web.StreamResponse = await handler(request)
            made = self.stats.runs_created - before
            if request.method == "POST" and made:
                self.create_requests.append((time.time(), made))
            return response

        app.middlewares.append(stamp)
        app.router.add_get("/_test/stats", self._stats)
        app.router.add_post("/_test/control", self._control)
        return app

    async def _stats(self, request: web.Request) -> web.Response:
        per_row: Counter[str] = Counter()
        for record in self.store.runs.values():
            meta = record.input.get("metadata") or {}
            row = meta.get("pa_row")
            if row is not None:
                per_row[f"{record.taskgroup_id}/{row}"] += 1
        body = {
            "runs_created": self.stats.runs_created,
            "rate_limited": self.stats.rate_limited,
            "add_requests": self.stats.requests["group_add_runs"],
            "group_creates": self.stats.requests["group_create"],
            "run_times": [r.created_at for r in self.store.runs.values()],
            "create_requests": self.create_requests,
            "rows": len(per_row),
            "duplicated_rows": sum(1 for n in per_row.values() if n > 1),
            "active": sum(1 for r in self.store.runs.values() if not r.is_terminal),
            "adds_pending": self.group_store.adds_pending,
        }
        return web.json_response(body)

    async def _control(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "duration" in body:
            self.duration = float(body["duration"])
        if "add_delay" in body:
            self.group_store.add_delay = float(body["add_delay"])
        if "rate" in body:
            rate = body["rate"]
            self.limiter = None if rate is None else SlidingWindow(int(rate[0]), float(rate[1]))
        return web.json_response({"ok": True})


async def _serve(duration: float, rate: tuple[int, float] | None) -> None:
    fake = _StatsFake(api_key=API_KEY, duration=duration, create_rate_limit=rate)
    async with FakeServer(fake, shutdown_timeout=0.5) as server:
        print(server.url, flush=True)
        # stdin closing (the test ended, or died) stops the server
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    fake.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=0.2)
    parser.add_argument("--rate", default=None, help="N:W, the server's own create limit")
    args = parser.parse_args()
    rate = None
    if args.rate:
        n, w = args.rate.split(":")
        rate = (int(n), float(w))
    asyncio.run(_serve(args.duration, rate))


class ClusterServer:
    """The fake server process: ``with ClusterServer() as server: server.url``."""

    def __init__(self, *, duration: float = 0.2, rate: tuple[int, float] | None = None) -> None:
        args = [sys.executable, __file__, "--duration", str(duration)]
        if rate is not None:
            args += ["--rate", f"{rate[0]}:{rate[1]}"]
        self._args = args
        self._process: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> ClusterServer:
        self._process = subprocess.Popen(  # noqa: S603 - our own script
            self._args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        self.url = self._process.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.__exit__()
            raise RuntimeError(f"the fake server did not start: {self.url!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def stats(self) -> dict[str, Any]:
        """What the server saw (see the module docs)."""
        with urllib.request.urlopen(f"{self.url}/_test/stats", timeout=30) as r:  # noqa: S310
            data: dict[str, Any] = json.load(r)
        return data

    def settled(self, timeout: float = 60.0) -> dict[str, Any]:
        """The stats once no accepted add is still creating its runs (of a client gone)."""
        deadline = time.monotonic() + timeout
        while (stats := self.stats())["adds_pending"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the server's adds never finished")
            time.sleep(0.05)
        return stats

    def control(self, **settings: Any) -> None:
        """Change the server's settings (see the module docs)."""
        request = urllib.request.Request(  # noqa: S310 - our own test server
            f"{self.url}/_test/control",
            data=json.dumps(settings).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30):  # noqa: S310
            pass

    def env(self) -> dict[str, str]:
        """The environment that points a client (driver or worker) at this server."""
        return {"PARALLEL_API_KEY": API_KEY, "PARALLEL_BASE_URL": self.url}


class LocalLink:
    """A coordinator in this process, reached like the actor or the driver service."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    async def begin(self, partition: int, token: str) -> float:
        return self.coordinator.begin(partition, token, time.monotonic())

    async def acquire(self, partition: int, token: str, runs: int) -> Grant:
        return self.coordinator.acquire(partition, token, runs, time.monotonic())

    async def release(self, partition: int, token: str, grants: list[int]) -> None:
        self.coordinator.release(partition, token, grants)

    async def pause(self, seconds: float) -> None:
        self.coordinator.pause(seconds, time.monotonic())


def most_in_window(times: list[float], window: float, weights: list[int] | None = None) -> int:
    """The most events (summed ``weights``) seen in any ``window`` seconds."""
    events = sorted(zip(times, weights or [1] * len(times), strict=True))
    best = total = 0
    start = 0
    for end in range(len(events)):
        total += events[end][1]
        while events[end][0] - events[start][0] >= window:
            total -= events[start][1]
            start += 1
        best = max(best, total)
    return best


if __name__ == "__main__":
    main()

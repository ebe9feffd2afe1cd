"""The benchmark's fake server (run as its own process) and the harness's calls to it.

``python benchmarks/server.py --port 0`` serves a manual-mode ``FakeParallel``: runs stay
``running`` until the harness schedules their completion through ``POST /_bench/schedule``
(``{"run_ids": [...], "delays": [...]}``, seconds from now). That lets the harness create
runs before a measurement starts and still have them finish *during* it, at seeded times
spread over a few seconds, so delivery lag (client receive time minus the run's
``modified_at``) is meaningful. ``GET /_bench/stats`` returns the fake's request counters.

The process prints ``URL <base url>`` on stdout once listening and serves until SIGTERM.

With ``--control`` the harness drives the server over the process's stdin/stdout instead of
HTTP (one JSON command a line, one JSON answer a line; see ``ControlledServer``), so the
only TCP connections the server counts are the measured client's. Runs can then also be
created server-side (no HTTP), and a create body whose input says ``duration=<seconds>``
completes on its own after that long (for clients that create their own runs).

Runs created with a ``webhook`` get their end POSTed there, signed with ``--webhook-secret``
(the fake's default otherwise). The ``faults`` command scripts or randomises the fake's
faults for an endpoint (``"webhook"``: deliveries lost, repeated or late), and ``webhooks``
reports the deliveries (counts by state, the runs whose delivery was lost).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from parallel_async.testing import FakeParallel, FakeServer, Fault, RunPlan, Stats

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
        return web.json_response(stats_snapshot(self.stats))


def stats_snapshot(stats: Stats) -> dict[str, Any]:
    """The fake's counters as JSON-ready data (cumulative since start or the last reset)."""
    return {
        "requests": dict(stats.requests),
        "statuses": {str(k): v for k, v in stats.statuses.items()},
        "max_open_connections": stats.max_open_connections,
        "connections_total": stats.connections_total,
        "max_result_in_flight": stats.max_result_in_flight,
        "result_requests_by_run": dict(stats.result_requests_by_run),
        "max_result_open_by_run": dict(stats.max_result_open_by_run),
    }


def webhooks_snapshot(fake: FakeParallel) -> dict[str, Any]:
    """The fake's webhook deliveries: counts by state and fault, and the runs never told."""
    sender = fake.webhooks
    deliveries = sender.deliveries
    return {
        "deliveries": len(deliveries),
        "states": dict(Counter(d.state for d in deliveries)),
        "faults": dict(Counter(d.fault for d in deliveries if d.fault is not None)),
        "posts": sender.sent,
        "pending": sender.pending,
        "lost_run_ids": [d.run_id for d in deliveries if d.state == "lost"],
        "late_run_ids": [d.run_id for d in deliveries if d.fault == "slow"],
    }


def fault_from_spec(spec: str | dict[str, Any]) -> Fault:
    """``"drop"``, ``"duplicate"``, ``"ok"``, ``"drop_after"``, ``"malformed"``, or
    ``{"kind": "slow", "seconds": s}`` / ``{"kind": "status", "code": c}`` as a `Fault`."""
    kind = spec if isinstance(spec, str) else spec["kind"]
    if kind == "slow" and isinstance(spec, dict):
        return Fault.slow(float(spec["seconds"]))
    if kind == "status" and isinstance(spec, dict):
        return Fault.status(int(spec["code"]))
    simple = {
        "drop": Fault.drop,
        "duplicate": Fault.duplicate,
        "ok": Fault.ok,
        "drop_after": Fault.drop_after,
        "malformed": Fault.malformed,
    }
    if kind not in simple:
        raise ValueError(f"unknown fault {spec!r}")
    return simple[kind]()


_DURATION = re.compile(r"duration=([0-9.]+)")


def plan_from_input(body: dict[str, Any]) -> RunPlan | None:
    """A run whose input text says ``duration=<seconds>`` completes after that long."""
    found = _DURATION.search(str(body.get("input", "")))
    return None if found is None else RunPlan(duration=float(found.group(1)))


def _set_faults(fake: FakeParallel, command: dict[str, Any]) -> dict[str, Any]:
    """The ``faults`` command: an endpoint's script and/or probability table."""
    try:
        endpoint = command["endpoint"]
        if "script" in command:
            fake.faults.script(endpoint, map(fault_from_spec, command["script"]))
        if "probabilities" in command:
            table = {fault_from_spec(f): p for f, p in command["probabilities"]}
            fake.faults.probabilities(endpoint, table)
    except (KeyError, TypeError, ValueError) as exc:
        return {"error": f"faults: {exc}"}
    return {}


async def _control(fake: BenchFake) -> None:
    """Answer the harness's commands on stdin until ``stop`` or EOF (see ``ControlledServer``)."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    body = {"input": "benchmark input", "processor": "lite"}
    while line := await stdin.readline():
        command = json.loads(line)
        op = command["op"]
        answer: dict[str, Any] = {"op": op}
        if op == "create":
            answer["run_ids"] = [fake.store.create(body).run_id for _ in range(command["n"])]
        elif op == "schedule":
            for run_id, delay in zip(command["run_ids"], command["delays"], strict=True):
                loop.call_later(delay, fake._complete_quietly, run_id)
        elif op == "reset":
            # Let connections of earlier phases finish closing so the maxima are this phase's.
            for _ in range(500):  # at most 5 s
                if not fake.stats.open_connections:
                    break
                await asyncio.sleep(0.01)
            answer["open_connections"] = fake.stats.open_connections
            fake.stats.reset()
        elif op == "stats":
            answer.update(stats_snapshot(fake.stats))
        elif op == "faults":
            answer.update(_set_faults(fake, command))
        elif op == "webhooks":
            answer.update(webhooks_snapshot(fake))
        elif op == "stop":
            print(json.dumps(answer), flush=True)
            return
        else:
            answer["error"] = f"unknown op {op!r}"
        print(json.dumps(answer), flush=True)


async def _serve(
    host: str, port: int, *, control: bool = False, webhook_secret: str | None = None
) -> None:
    fake = BenchFake(api_key=API_KEY, manual=True, plan=plan_from_input if control else None)
    if webhook_secret is not None:
        fake.webhooks.secret = webhook_secret
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with FakeServer(fake, host, port, shutdown_timeout=0.5) as server:
        print(f"URL {server.url}", flush=True)
        if control:
            controller = asyncio.ensure_future(_control(fake))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({controller, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            controller.cancel()
        else:
            await stop.wait()
    fake.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--control", action="store_true", help="take commands on stdin")
    parser.add_argument(
        "--webhook-secret",
        help="the secret webhook deliveries are signed with (default: the fake's)",
    )
    args = parser.parse_args(argv)
    asyncio.run(
        _serve(args.host, args.port, control=args.control, webhook_secret=args.webhook_secret)
    )


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


class ControlledServer:
    """A ``server.py --control`` process: the fake, driven over stdin/stdout, not HTTP.

    ``async with ControlledServer() as server:`` then ``server.url`` and the commands:
    ``create(n)`` (run ids, created server-side), ``schedule(run_ids, delays)``, ``reset()``
    (waits for open connections to close, then zeroes the counters), ``stats()``,
    ``faults(endpoint, script=..., probabilities=...)`` and ``webhooks()``.
    ``webhook_secret`` signs the fake's webhook deliveries (default: the fake's own).
    """

    def __init__(self, *, webhook_secret: str | None = None) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._webhook_secret = webhook_secret
        self.url = ""

    async def __aenter__(self) -> ControlledServer:
        secret = [] if self._webhook_secret is None else ["--webhook-secret", self._webhook_secret]
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--port",
            "0",
            "--control",
            *secret,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**26,  # an answer is one line: per-run counters of thousands of runs
        )
        assert self._proc.stdout is not None
        line = (await asyncio.wait_for(self._proc.stdout.readline(), 30)).decode().strip()
        if not line.startswith("URL "):
            await self._close()
            raise RuntimeError(f"fake server did not start (said {line!r})")
        self.url = line.removeprefix("URL ")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def _close(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(OSError, RuntimeError, asyncio.TimeoutError, ValueError):
            await self.call("stop")
        for signal_it in (proc.terminate, proc.kill):
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    signal_it()
            else:
                return
        await proc.wait()

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one command; return the server's answer."""
        proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        await proc.stdin.drain()
        answer: dict[str, Any] = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    async def create(self, n: int) -> list[str]:
        """Create ``n`` runs server-side (manual: they run until scheduled)."""
        run_ids: list[str] = (await self.call("create", n=n))["run_ids"]
        return run_ids

    async def schedule(self, run_ids: Sequence[str], delays: Sequence[float]) -> None:
        """Complete each run ``delays[i]`` seconds from now."""
        await self.call("schedule", run_ids=list(run_ids), delays=list(delays))

    async def reset(self) -> None:
        """Zero the counters once earlier connections have closed."""
        await self.call("reset")

    async def stats(self) -> dict[str, Any]:
        """The counters since the last reset (see ``stats_snapshot``)."""
        return await self.call("stats")

    async def faults(
        self,
        endpoint: str,
        *,
        script: Sequence[str | dict[str, Any]] | None = None,
        probabilities: Sequence[tuple[str | dict[str, Any], float]] | None = None,
    ) -> None:
        """Set ``endpoint``'s fault script and/or probability table (see ``fault_from_spec``)."""
        fields: dict[str, Any] = {"endpoint": endpoint}
        if script is not None:
            fields["script"] = list(script)
        if probabilities is not None:
            fields["probabilities"] = [list(row) for row in probabilities]
        await self.call("faults", **fields)

    async def webhooks(self) -> dict[str, Any]:
        """The fake's webhook deliveries so far (see ``webhooks_snapshot``)."""
        return await self.call("webhooks")


if __name__ == "__main__":
    main()

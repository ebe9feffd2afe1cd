"""The web-app shape: many request handlers awaiting ``task_run.result()`` on one shared client.

    python benchmarks/webapp.py [--parts A B C] [--scale 1] [--width 50] [--via result]

Only the public API is measured (``client.task_run.result``, ``.execute``, ``.create``). The
fake server runs in its own process (``server.py --control``: driven over a pipe, so every
TCP connection it counts is the client's); the client runs in another, started fresh for
each part, which measures from ``go`` on.

- **A. Handlers.** ``--handlers`` (500) tasks on ONE ``AsyncParallel(max_in_flight=--width)``,
  each awaiting ``result()`` of its own run (``--via execute``: each creates and awaits its run
  with ``execute()``). ``--slow`` (100) runs take 40 s, the others 1-10 s (seeded), every
  duration times ``--scale``. Reported: the fast runs' delivery lag (the handler's
  ``time.time()`` when ``result()`` returned minus the run's ``modified_at``, when the server
  completed it; same machine, same clock) p50/p99/max, the most TCP connections the server
  saw open at once, ``/result`` requests per run, and whether every handler got its own
  result exactly once.
- **B. One run, many waiters.** ``--waiters`` (200) handlers await ``result()`` of the SAME run
  (5 s x scale): the most ``/result`` requests open for that run at any moment and the total,
  both counted by the server. Then ``--trials`` (20) single waiters, one after another, each
  creating a run of 1-2 s x scale and awaiting ``result()``: that waiter's lag p50/p99.
- **C. CPU against the floor.** ``run.py``'s comparison for the poll strategy
  (``as_completed`` without a group) at N = 1,000, width 256: CPU per run of parallel-async /
  the hand-written aiohttp+msgspec loop, medians of ``--repeat-c`` (3). Not scaled; the same
  as ``python benchmarks/run.py --n 1000 --clients parallel-async aiohttp-loop --repeat 3``.

Measures the ``parallel_async`` of the tree this file is in. Prints markdown; writes JSON to
``benchmarks/results/webapp-<timestamp>.json``. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Measure this tree's parallel_async, here and in every child process (servers, clients, run.py).
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
)

from clients import BASELINE  # noqa: E402
from measure import _cpu_seconds, _parse_rfc3339, percentile  # noqa: E402
from server import API_KEY, ControlledServer  # noqa: E402

RESULTS = HERE / "results"
CHILD_TIMEOUT = 1800.0
SLOW_SECONDS = 40.0
FAST_SECONDS = (1.0, 10.0)
SAME_RUN_SECONDS = 5.0
SINGLE_SECONDS = (1.0, 2.0)

Record = dict[str, Any]


# --- client process -----------------------------------------------------------------------------


async def _handlers(client: Any, spec: dict[str, Any], delivered: list[int]) -> list[Record]:
    """One task per handler, all at once; each awaits one result and records it."""
    via_execute = spec["mode"] == "execute"
    targets: list[Any] = spec["durations"] if via_execute else spec["run_ids"]
    records: list[Record] = [{"want": None if via_execute else t} for t in targets]

    async def handler(i: int, target: Any) -> None:
        record = records[i]
        started = time.time()
        try:
            if via_execute:
                result = await client.task_run.execute(
                    input=f"webapp handler {i} duration={target:.3f}", processor="lite"
                )
            else:
                result = await client.task_run.result(target)
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"[:300]
            return
        received = time.time()
        delivered.append(i)
        record["got"] = result.run.run_id
        record["lag"] = received - _parse_rfc3339(result.run.modified_at)
        record["elapsed"] = received - started

    await asyncio.gather(*(handler(i, t) for i, t in enumerate(targets)))
    return records


async def _single_waiters(
    client: Any, durations: list[float], delivered: list[int]
) -> list[Record]:
    """One handler at a time: create a run, then await its ``result()``."""
    records: list[Record] = []
    for i, seconds in enumerate(durations):
        run = await client.task_run.create(
            input=f"single waiter {i} duration={seconds:.3f}", processor="lite"
        )
        record: Record = {"want": run.run_id}
        try:
            result = await client.task_run.result(run.run_id)
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            received = time.time()
            delivered.append(i)
            record["got"] = result.run.run_id
            record["lag"] = received - _parse_rfc3339(result.run.modified_at)
        records.append(record)
    return records


def child_main(spec_path: Path) -> None:
    """The client process: import, say ``ready``, wait for ``go``, measure, write JSON."""
    from parallel_async import AsyncParallel

    spec = json.loads(spec_path.read_text())
    delivered: list[int] = []
    print("ready", flush=True)
    sys.stdin.readline()

    async def main() -> list[Record]:
        async with AsyncParallel(
            api_key=API_KEY, base_url=spec["url"], max_in_flight=spec["width"]
        ) as client:
            if spec["mode"] == "single":
                return await _single_waiters(client, spec["durations"], delivered)
            return await _handlers(client, spec, delivered)

    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    records = asyncio.run(main())
    cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    out = {"records": records, "delivered": delivered, "cpu_s": cpu, "wall_s": wall}
    Path(spec["out"]).write_text(json.dumps(out))


class Child:
    """A client process for one part: started, ``ready``, then ``go()`` and ``result()``.

    ``script`` is the benchmark whose ``--child SPEC`` mode the process runs (this file by
    default); ``label`` names its spec file.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        workdir: Path,
        *,
        script: str = __file__,
        label: str = "",
        timeout: float = CHILD_TIMEOUT,
    ) -> None:
        self._script = script
        self._timeout = timeout
        name = label or spec["mode"]
        self.spec_path = workdir / f"spec-{name}-{time.monotonic_ns()}.json"
        self.out = self.spec_path.with_suffix(".out.json")
        self.spec_path.write_text(json.dumps({**spec, "out": str(self.out)}))
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Child:
        self._proc = proc = await asyncio.create_subprocess_exec(
            sys.executable,
            self._script,
            "--child",
            str(self.spec_path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 120)
        if ready.strip() != b"ready":
            raise RuntimeError(f"client process did not get ready (said {ready!r})")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def go(self) -> None:
        """Start the measurement."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(b"go\n")
        await self._proc.stdin.drain()

    async def result(self) -> dict[str, Any]:
        """Wait for the client to finish; its measurements."""
        assert self._proc is not None
        code = await asyncio.wait_for(self._proc.wait(), self._timeout)
        if code != 0:
            raise RuntimeError(f"client process exited with status {code}")
        out: dict[str, Any] = json.loads(self.out.read_text())
        return out


# --- harness ------------------------------------------------------------------------------------


def _deliveries(out: dict[str, Any], handlers: int) -> dict[str, Any]:
    """Did every handler get its own result, exactly once?"""
    records: list[Record] = out["records"]
    times = Counter(out["delivered"])
    got = [r.get("got") for r in records]
    wrong = sum(
        1 for r in records if r["want"] is not None and "got" in r and r["got"] != r["want"]
    )
    errors = [r["error"] for r in records if "error" in r]
    return {
        "handlers": handlers,
        "got_result": sum(1 for g in got if g is not None),
        "delivered_exactly_once": sum(1 for i in range(handlers) if times[i] == 1),
        "delivered_twice_or_more": sum(1 for i in range(handlers) if times[i] > 1),
        "wrong_run": wrong,
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def _lags_ms(records: Sequence[Record], key: str = "lag") -> dict[str, float]:
    lags = [r[key] for r in records if key in r]
    return {
        "p50": percentile(lags, 50) * 1e3,
        "p99": percentile(lags, 99) * 1e3,
        "max": max(lags, default=float("nan")) * 1e3,
    }


async def part_a(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """500 handlers, each awaiting its own run; 100 slow."""
    n, slow, scale = args.handlers, args.slow, args.scale
    rng = random.Random(f"webapp-{args.seed}")
    durations = [SLOW_SECONDS * scale] * slow
    durations += [rng.uniform(*FAST_SECONDS) * scale for _ in range(n - slow)]
    rng.shuffle(durations)
    async with ControlledServer() as server:
        spec: dict[str, Any] = {"url": server.url, "width": args.width, "durations": durations}
        if args.via == "result":
            spec.update(mode="handlers", run_ids=await server.create(n))
        else:
            spec.update(mode="execute")
        async with Child(spec, workdir) as child:
            await server.reset()
            await child.go()
            if args.via == "result":
                await server.schedule(spec["run_ids"], durations)
            out = await child.result()
        stats = await server.stats()
    records: list[Record] = out["records"]
    is_slow = [d >= SLOW_SECONDS * scale for d in durations]
    for record, seconds in zip(records, durations, strict=True):
        if "elapsed" in record:
            record["beyond_duration"] = record["elapsed"] - seconds
    fast = [r for r, s in zip(records, is_slow, strict=True) if not s]
    per_run = stats["result_requests_by_run"]

    def mean_requests(group: list[Record]) -> float:
        ids = [r["got"] for r in group if "got" in r]
        return float(sum(per_run.get(i, 0) for i in ids)) / max(1, len(ids))

    return {
        "part": "A",
        "via": args.via,
        "scale": scale,
        "handlers": n,
        "slow_runs": slow,
        "width": args.width,
        "durations_s": {"slow": SLOW_SECONDS * scale, "fast": [x * scale for x in FAST_SECONDS]},
        "fast_lag_ms": _lags_ms(fast),
        "fast_beyond_duration_ms": _lags_ms(fast, "beyond_duration"),
        "slow_lag_ms": _lags_ms([r for r, s in zip(records, is_slow, strict=True) if s]),
        "max_open_connections": stats["max_open_connections"],
        "connections_total": stats["connections_total"],
        "result_requests": stats["requests"].get("result", 0),
        "result_requests_per_run": stats["requests"].get("result", 0) / n,
        "result_requests_per_fast_run": mean_requests(fast),
        "result_requests_per_slow_run": mean_requests(
            [r for r, s in zip(records, is_slow, strict=True) if s]
        ),
        "result_requests_max_one_run": max(per_run.values(), default=0),
        "creates": stats["requests"].get("create", 0),
        "statuses": stats["statuses"],
        "deliveries": _deliveries(out, n),
        "wall_s": out["wall_s"],
        "cpu_s": out["cpu_s"],
    }


async def part_b(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """200 handlers on one run; then single waiters, one run each."""
    scale = args.scale
    async with ControlledServer() as server:
        (run_id,) = await server.create(1)
        spec = {"url": server.url, "width": args.width, "mode": "handlers"}
        async with Child({**spec, "run_ids": [run_id] * args.waiters}, workdir) as child:
            await server.reset()
            await child.go()
            await server.schedule([run_id], [SAME_RUN_SECONDS * scale])
            same = await child.result()
        same_stats = await server.stats()
    rng = random.Random(f"single-{args.seed}")
    durations = [rng.uniform(*SINGLE_SECONDS) * scale for _ in range(args.trials)]
    async with ControlledServer() as server:
        spec = {"url": server.url, "width": args.width, "mode": "single", "durations": durations}
        async with Child(spec, workdir) as child:
            await server.reset()
            await child.go()
            single = await child.result()
        single_stats = await server.stats()
    return {
        "part": "B",
        "scale": scale,
        "width": args.width,
        "waiters": args.waiters,
        "same_run_seconds": SAME_RUN_SECONDS * scale,
        "same_run_max_open_result": same_stats["max_result_open_by_run"].get(run_id, 0),
        "same_run_result_requests": same_stats["result_requests_by_run"].get(run_id, 0),
        "same_run_max_open_connections": same_stats["max_open_connections"],
        "same_run_lag_ms": _lags_ms(same["records"]),
        "same_run_deliveries": _deliveries(same, args.waiters),
        "trials": args.trials,
        "single_seconds": [x * scale for x in SINGLE_SECONDS],
        "single_lag_ms": _lags_ms(single["records"]),
        "single_result_requests_per_trial": single_stats["requests"].get("result", 0) / args.trials,
        "single_deliveries": _deliveries(single, args.trials),
    }


async def part_c(args: argparse.Namespace) -> dict[str, Any]:
    """run.py's client comparison, poll strategy, N = 1,000 at width 256."""
    import run

    settings = run.Settings(
        ns=[1000],
        width=256,
        clients=["parallel-async", BASELINE],
        spread=(0.5, 5.0),
        repeat=args.repeat_c,
        sdk_defaults_max_n=None,
        profile=False,
        seed=args.seed,
    )
    cells = await run.run_all(settings)
    rows = run.aggregate(cells).get(1000, {})
    pa, loop = rows.get("parallel-async"), rows.get(BASELINE)
    if pa is None or loop is None:
        return {"part": "C", "error": [c.get("error") for c in cells if "error" in c]}
    per_request = (pa["cpu_s"] / pa["result_requests"]) / (loop["cpu_s"] / loop["result_requests"])
    return {
        "part": "C",
        "n": 1000,
        "width": 256,
        "repeat": args.repeat_c,
        "cpu_ratio": pa["cpu_per_run_us"] / loop["cpu_per_run_us"],
        "cpu_ratio_per_request": per_request,
        "ratios_each_repeat": [
            a["cpu_per_run_us"] / b["cpu_per_run_us"]
            for a, b in zip(
                [c for c in cells if c.get("client") == "parallel-async" and "error" not in c],
                [c for c in cells if c.get("client") == BASELINE and "error" not in c],
                strict=False,
            )
        ],
        "parallel_async": pa,
        "aiohttp_loop": loop,
    }


# --- report -------------------------------------------------------------------------------------


def _table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| measure | value | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def _once(d: dict[str, Any]) -> str:
    text = (
        f"{d['delivered_exactly_once']} / {d['handlers']} (wrong run {d['wrong_run']}, "
        f"twice {d['delivered_twice_or_more']}, errors {d['errors']})"
    )
    return text + (f" e.g. {d['first_errors'][0]}" if d["first_errors"] else "")


def report_a(a: dict[str, Any]) -> str:
    fast, slow, beyond = a["fast_lag_ms"], a["slow_lag_ms"], a["fast_beyond_duration_ms"]
    lo, hi = a["durations_s"]["fast"]
    head = (
        f"**A. Web-app shape, scale {a['scale']:g}**: {a['handlers']} handlers await "
        f"`{a['via']}()` on one client, max_in_flight={a['width']}; {a['slow_runs']} runs take "
        f"{a['durations_s']['slow']:g} s, {a['handlers'] - a['slow_runs']} take "
        f"{lo:g}-{hi:g} s. Wall {a['wall_s']:.1f} s, CPU {a['cpu_s']:.2f} s.\n\n"
    )
    return head + _table(
        [
            ("fast-run lag p50 / p99 / max (ms)", f"{fast['p50']:.0f} / {fast['p99']:.0f} / "
             f"{fast['max']:.0f}", "p99 <= 5000 (scale 1)"),
            ("fast handlers' wait beyond their run's duration p50 / p99 (ms)",
             f"{beyond['p50']:.0f} / {beyond['p99']:.0f}", ""),
            ("slow-run lag p50 / p99 (ms)", f"{slow['p50']:.0f} / {slow['p99']:.0f}", ""),
            ("max open connections (server)", str(a["max_open_connections"]),
             f"<= {a['width'] + 2}"),
            ("/result requests: total, per run (fast / slow / most on one run)",
             f"{a['result_requests']}, {a['result_requests_per_run']:.2f} "
             f"({a['result_requests_per_fast_run']:.2f} / {a['result_requests_per_slow_run']:.2f}"
             f" / {a['result_requests_max_one_run']})", ""),
            ("handlers with their own result, exactly once", _once(a["deliveries"]), "all"),
        ]
    )  # fmt: skip


def report_b(b: dict[str, Any]) -> str:
    same, single = b["same_run_lag_ms"], b["single_lag_ms"]
    lo, hi = b["single_seconds"]
    head = (
        f"**B. One run, many waiters, scale {b['scale']:g}**: {b['waiters']} handlers await "
        f"`result()` of one run ({b['same_run_seconds']:g} s), max_in_flight={b['width']}; then "
        f"{b['trials']} single waiters (create, then `result()`; runs of {lo:g}-{hi:g} s).\n\n"
    )
    return head + _table(
        [
            ("max /result open for the run at once (server)",
             str(b["same_run_max_open_result"]), "<= 1"),
            ("/result requests for the run", str(b["same_run_result_requests"]), ""),
            ("max open connections (server)", str(b["same_run_max_open_connections"]), ""),
            ("waiters' lag p50 / p99 (ms)", f"{same['p50']:.0f} / {same['p99']:.0f}", ""),
            ("waiters with the result, exactly once", _once(b["same_run_deliveries"]), "all"),
            (f"single waiter lag p50 / p99 (ms), {b['trials']} trials",
             f"{single['p50']:.1f} / {single['p99']:.1f}", "<= 100"),
            ("single waiter /result requests per trial",
             f"{b['single_result_requests_per_trial']:.2f}", ""),
            ("single waiters with their result", _once(b["single_deliveries"]), "all"),
        ]
    )  # fmt: skip


def report_c(c: dict[str, Any]) -> str:
    if "error" in c:
        return f"**C.** failed: {c['error']}"
    pa, loop = c["parallel_async"], c["aiohttp_loop"]
    each = ", ".join(f"{r:.2f}" for r in c["ratios_each_repeat"])
    head = (
        f"**C. CPU against the hand-written loop**: poll strategy (`as_completed`, no group), "
        f"N = {c['n']:,}, width {c['width']}, medians of {c['repeat']} (not scaled).\n\n"
    )
    return head + _table(
        [
            ("CPU per run, parallel-async / aiohttp-loop", f"{c['cpu_ratio']:.2f} ({each})",
             "<= 1.25"),
            ("CPU per /result request, ratio", f"{c['cpu_ratio_per_request']:.2f}", ""),
            ("CPU µs per run (parallel-async, loop)",
             f"{pa['cpu_per_run_us']:.0f}, {loop['cpu_per_run_us']:.0f}", ""),
            ("/result requests (parallel-async, loop)",
             f"{pa['result_requests']:.0f}, {loop['result_requests']:.0f}", ""),
            ("lag p99 ms (parallel-async, loop)",
             f"{pa['lag_p99_ms']:.0f}, {loop['lag_p99_ms']:.0f}", ""),
        ]
    )  # fmt: skip


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


async def run_parts(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pa-webapp-") as tmp:
        for part in args.parts:
            print(f"part {part} (scale {args.scale:g}) ...", file=sys.stderr, flush=True)
            if part == "A":
                results.append(await part_a(args, Path(tmp)))
            elif part == "B":
                results.append(await part_b(args, Path(tmp)))
            else:
                results.append(await part_c(args))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=["A", "B", "C"], default=["A", "B", "C"])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every run duration")
    parser.add_argument("--width", type=int, default=50, help="max_in_flight of the client")
    parser.add_argument("--via", choices=["result", "execute"], default="result", help="A only")
    parser.add_argument("--handlers", type=int, default=500, help="A: handlers = runs")
    parser.add_argument("--slow", type=int, default=100, help="A: runs of 40 s x scale")
    parser.add_argument("--waiters", type=int, default=200, help="B: waiters of one run")
    parser.add_argument("--trials", type=int, default=20, help="B: single-waiter trials")
    parser.add_argument("--repeat-c", type=int, default=3, help="C: repeats (medians)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child_main(args.child)
        return
    if not args.scale > 0 or not 0 <= args.slow <= args.handlers:
        parser.error("--scale must be > 0 and --slow between 0 and --handlers")
    results = asyncio.run(run_parts(args))
    render = {"A": report_a, "B": report_b, "C": report_c}
    lines = [
        f"parallel-async {_commit()}, {platform.platform()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; scale {args.scale:g}",
    ]
    lines += [render[r["part"]](r) for r in results]
    print("\n\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"argv": sys.argv[1:], "commit": _commit(), "results": results}
    (RESULTS / f"webapp-{stamp}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

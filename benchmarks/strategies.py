"""Tracking strategies side by side: ``map(strategy="group")`` vs ``map(strategy="poll")``.

    python benchmarks/strategies.py [--n 1000 10000] [--width 50] [--long-share 0.1]

For each N and strategy: a fresh fake server process whose runs last a seeded duration (most
between ``--short`` seconds, a share ``--long-share`` of ``--long`` seconds: the mixed workload
where rotation hurts), then a fresh child process that creates and awaits every run through
``client.map`` and measures CPU seconds, wall time, peak RSS and the delivery lag of every
outcome (client time when yielded minus the run's completion time on the server, the
``modified_at`` of its result; same machine, same clock). The server reports the most TCP
connections it saw open at once. Prints a markdown table; writes JSON to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from measure import _cpu_seconds, _parse_rfc3339, _peak_rss_mb, percentile  # noqa: E402

API_KEY = "bench-key"
RESULTS = HERE / "results"


# --- server process -----------------------------------------------------------------------------


def serve(short: tuple[float, float], long: float, long_share: float, seed: int) -> None:
    """Serve a fake whose run durations come from the input text (seeded, reproducible)."""
    from parallel_async.testing import FakeParallel, FakeServer, RunPlan

    def plan(body: dict[str, Any]) -> RunPlan:
        rng = random.Random(f"{seed}:{body['input']}")
        if rng.random() < long_share:
            return RunPlan(duration=long)
        return RunPlan(duration=rng.uniform(*short))

    async def main() -> None:
        fake = FakeParallel(api_key=API_KEY, plan=plan)
        async with FakeServer(fake, "127.0.0.1", 0, shutdown_timeout=0.5) as server:
            print(f"URL {server.url}", flush=True)
            line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            del line  # the harness asks for the stats, then we stop
            stats = fake.stats
            print(
                json.dumps(
                    {
                        "max_open_connections": stats.max_open_connections,
                        "requests": dict(stats.requests),
                        "runs_created": stats.runs_created,
                    }
                ),
                flush=True,
            )
        fake.close()

    asyncio.run(main())


# --- client process -----------------------------------------------------------------------------


def measure(url: str, n: int, width: int, strategy: str) -> None:
    """Create and await ``n`` runs through ``map``; print the measurements as JSON."""
    from parallel_async import AsyncParallel

    lags: list[float] = []
    failed = 0

    async def main() -> None:
        nonlocal failed
        async with (
            AsyncParallel(
                api_key=API_KEY, base_url=url, max_in_flight=width, create_rate_limit=None
            ) as client,
            client.map(  # type: ignore[call-overload]
                [f"item {i}" for i in range(n)],
                processor="lite",
                strategy=strategy,
                timeout=3600,
            ) as outcomes,
        ):
            async for o in outcomes:
                if o.result is None or o.result.run.modified_at is None:
                    failed += 1
                else:
                    lags.append(time.time() - _parse_rfc3339(o.result.run.modified_at))

    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    asyncio.run(main())
    cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    print(
        json.dumps(
            {
                "ok": len(lags),
                "failed": failed,
                "wall_s": wall,
                "cpu_per_run_us": cpu / n * 1e6,
                "peak_rss_mb": _peak_rss_mb(),
                "lag_p50_ms": percentile(lags, 50) * 1000,
                "lag_p99_ms": percentile(lags, 99) * 1000,
            }
        )
    )


# --- harness ------------------------------------------------------------------------------------


def _cell(args: argparse.Namespace, n: int, strategy: str) -> dict[str, Any]:
    me = [sys.executable, __file__]
    server = subprocess.Popen(
        [
            *me,
            "--serve",
            "--short",
            str(args.short[0]),
            str(args.short[1]),
            "--long",
            str(args.long),
            "--long-share",
            str(args.long_share),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdin is not None
    try:
        url = server.stdout.readline().split()[1]
        child = subprocess.run(
            [
                *me,
                "--measure",
                url,
                "--n",
                str(n),
                "--width",
                str(args.width),
                "--strategy",
                strategy,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=3600,
        )
        row: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
        server.stdin.write("stats\n")
        server.stdin.flush()
        stats = json.loads(server.stdout.readline())
    finally:
        server.terminate()
        server.wait(timeout=30)
    row.update(n=n, strategy=strategy, width=args.width, **stats)
    return row


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--width", type=int, default=50)
    parser.add_argument("--strategies", nargs="+", default=["group", "poll"])
    parser.add_argument("--short", type=float, nargs=2, default=[0.5, 5.0])
    parser.add_argument("--long", type=float, default=40.0)
    parser.add_argument("--long-share", type=float, default=0.1)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(tuple(args.short), args.long, args.long_share, seed=7)
        return
    if args.measure:
        measure(args.measure, args.n[0], args.width, args.strategy)
        return
    rows = [_cell(args, n, s) for n in args.n for s in args.strategies]
    header = (
        "| N | strategy | ok | wall s | CPU µs/run | peak RSS MB | lag p50 ms | lag p99 ms "
        "| max connections | /result reqs |"
    )
    lines = [
        f"width {args.width}; durations U({args.short[0]:g}, {args.short[1]:g}) s, "
        f"{args.long_share:.0%} of runs {args.long:g} s",
        "",
        header,
        "|---" * (header.count("|") - 1) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['strategy']} | {r['ok']} / {r['n']} | {r['wall_s']:.1f} "
            f"| {r['cpu_per_run_us']:.0f} | {r['peak_rss_mb']:.1f} | {r['lag_p50_ms']:.0f} "
            f"| {r['lag_p99_ms']:.0f} | {r['max_open_connections']} "
            f"| {r['requests'].get('result', 0)} |"
        )
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"strategies-{stamp}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

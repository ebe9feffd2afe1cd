"""Benchmark orchestrator: parallel-async vs the official SDK vs a hand-written aiohttp loop.

    python benchmarks/run.py [--n 1000 10000] [--width 256] [--clients ...] [--quick]

For every N and client: start a fresh fake server process (``server.py``), create N runs
with plain aiohttp (not measured), start the client's own child process (``measure.py``),
and once it has imported everything schedule the runs to complete at seeded times spread
uniformly over ``--spread`` seconds, then let the child await them all. Prints markdown
tables and target verdicts; writes JSON (and the markdown) to ``benchmarks/results/``.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("parallel_async") is None:  # not installed: use the working tree
    sys.path.insert(0, str(HERE.parent))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p
    )

from clients import BASELINE, CLIENTS, DESCRIPTIONS  # noqa: E402
from server import API_KEY, create_runs, schedule, server_stats  # noqa: E402

RESULTS = HERE / "results"
ORDER = ["parallel-async", "aiohttp-loop", "sdk-fast", "sdk-defaults"]
CHILD_TIMEOUT = 1800.0
NUMERIC = (
    "completed",
    "failed",
    "wall_s",
    "cpu_s",
    "cpu_per_run_us",
    "peak_rss_mb",
    "rss_at_go_mb",
    "lag_p50_ms",
    "lag_p99_ms",
    "lag_max_ms",
    "result_requests",
    "responses_408",
)

Cell = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    ns: list[int]
    width: int
    clients: list[str]
    spread: tuple[float, float]
    repeat: int
    sdk_defaults_max_n: int | None
    profile: bool
    seed: int


# --- one measurement ----------------------------------------------------------------------------


async def _start_server() -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "server.py"), "--port", "0", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
    if not line.startswith("URL "):
        proc.terminate()
        await proc.wait()
        raise RuntimeError(f"fake server did not start (said {line!r})")
    return proc, line.removeprefix("URL ")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


async def run_cell(settings: Settings, client: str, n: int, rep: int, workdir: Path) -> Cell:
    """Measure ``client`` awaiting ``n`` fresh runs; returns the child's result + server counts."""
    server, url = await _start_server()
    try:
        ids = await create_runs(url, n)
        stem = workdir / f"{client}-{n}-{rep}"
        ids_file, out_file = stem.with_suffix(".ids"), stem.with_suffix(".json")
        ids_file.write_text("\n".join(ids))
        argv = [
            str(HERE / "measure.py"),
            *("--client", client, "--base-url", url, "--api-key", API_KEY),
            *("--ids", str(ids_file), "--width", str(settings.width), "--out", str(out_file)),
        ]
        profile_stem = RESULTS / f"profile-{client}-{n}"
        if settings.profile:
            argv += ["--profile", str(profile_stem)]
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            ready = await asyncio.wait_for(child.stdout.readline(), 120)
            if ready.strip() != b"ready":
                raise RuntimeError(f"{client} child did not get ready (said {ready!r})")
            rng = random.Random(f"{settings.seed}-{n}-{rep}")
            lo, hi = settings.spread
            await schedule(url, ids, [rng.uniform(lo, hi) for _ in ids])
            child.stdin.write(b"go\n")
            await child.stdin.drain()
            code = await asyncio.wait_for(child.wait(), CHILD_TIMEOUT)
        finally:
            await _stop(child)
        if code != 0:
            raise RuntimeError(f"{client} child exited with status {code}")
        cell: Cell = json.loads(out_file.read_text())
        counts = await server_stats(url)
        cell["result_requests"] = counts["requests"].get("result", 0)
        cell["responses_408"] = counts["statuses"].get("408", 0)
        cell["max_open_connections"] = counts["max_open_connections"]
        if settings.profile:
            cell["profile"] = str(profile_stem.with_suffix(".txt"))
        return cell
    finally:
        await _stop(server)


async def run_all(settings: Settings) -> list[Cell]:
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="pa-bench-") as tmp:
        for n in settings.ns:
            for rep in range(settings.repeat):
                for client in settings.clients:
                    limit = settings.sdk_defaults_max_n
                    if client == "sdk-defaults" and limit is not None and n > limit:
                        continue
                    label = f"N={n:>6} rep {rep + 1}/{settings.repeat} {client:<15}"
                    print(f"{label} ...", end="", flush=True, file=sys.stderr)
                    started = time.perf_counter()
                    try:
                        cell = await run_cell(settings, client, n, rep, Path(tmp))
                    except Exception as exc:  # keep going: one broken cell is not the run
                        print(f" FAILED: {exc!r}", file=sys.stderr)
                        cells.append({"client": client, "n": n, "rep": rep, "error": repr(exc)})
                        continue
                    took = time.perf_counter() - started
                    print(
                        f" {cell['cpu_per_run_us']:8.0f} us CPU/run, wall {cell['wall_s']:.2f} s"
                        f" ({took:.0f} s with setup)",
                        file=sys.stderr,
                    )
                    cells.append({**cell, "rep": rep})
    return cells


# --- aggregation and report ---------------------------------------------------------------------


def aggregate(cells: Sequence[Cell]) -> dict[int, dict[str, Cell]]:
    """Median of every numeric field over repeats, per N and client; ratios to the baseline."""
    table: dict[int, dict[str, Cell]] = {}
    groups: dict[tuple[int, str], list[Cell]] = {}
    for cell in cells:
        if "error" not in cell:
            groups.setdefault((cell["n"], cell["client"]), []).append(cell)
    for (n, client), group in groups.items():
        row: Cell = {"client": client, "n": n, "reps": len(group)}
        for key in NUMERIC:
            row[key] = statistics.median(c[key] for c in group)
        table.setdefault(n, {})[client] = row
    for row_by_client in table.values():
        base = row_by_client.get(BASELINE)
        for row in row_by_client.values():
            if base is None:
                continue
            row["cpu_ratio"] = row["cpu_per_run_us"] / base["cpu_per_run_us"]
            row["rss_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
            row["wall_ratio"] = row["wall_s"] / base["wall_s"]
    return table


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: dict[str, Cell], n: int, width: int) -> str:
    head = (
        f"N = {n:,}, width = {width}\n\n"
        "| client | ok / N | wall s | CPU µs/run | CPU / loop | peak RSS MB | RSS / loop "
        "| RSS growth MB | wall / loop | lag p50 ms | lag p99 ms | /result reqs | 408s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for client in [c for c in ORDER if c in rows]:
        r = rows[client]
        lines.append(
            f"| {client} | {r['completed']:.0f} / {n} | {r['wall_s']:.2f} "
            f"| {r['cpu_per_run_us']:.0f} | {_fmt(r.get('cpu_ratio'), '.2f')} "
            f"| {r['peak_rss_mb']:.1f} | {_fmt(r.get('rss_ratio'), '.2f')} "
            f"| {r['peak_rss_mb'] - r['rss_at_go_mb']:.1f} | {_fmt(r.get('wall_ratio'), '.2f')} "
            f"| {r['lag_p50_ms']:.1f} | {r['lag_p99_ms']:.1f} "
            f"| {r['result_requests']:.0f} | {r['responses_408']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def verdicts(table: dict[int, dict[str, Cell]]) -> list[dict[str, Any]]:
    """Evaluate the targets on whatever cells were measured."""
    out: list[dict[str, Any]] = []

    def add(target: str, value: float, limit: float, met: bool) -> None:
        out.append({"target": target, "value": value, "limit": limit, "met": met})

    pa = "parallel-async"
    for n, rows in sorted(table.items()):
        if pa in rows and BASELINE in rows:
            ratio = rows[pa]["cpu_per_run_us"] / rows[BASELINE]["cpu_per_run_us"]
            add(f"N={n}: CPU/run <= 1.25x aiohttp-loop", ratio, 1.25, ratio <= 1.25)
            ratio = rows[pa]["peak_rss_mb"] / rows[BASELINE]["peak_rss_mb"]
            add(f"N={n}: peak RSS <= 1.3x aiohttp-loop", ratio, 1.3, ratio <= 1.3)
    if table:
        n0 = 1000 if 1000 in table else min(table)
        rows = table[n0]
        for other, factor in (("sdk-fast", 4.0), ("sdk-defaults", 40.0)):
            if pa in rows and other in rows:
                ratio = rows[other]["cpu_per_run_us"] / rows[pa]["cpu_per_run_us"]
                add(f"N={n0}: CPU/run >= {factor:g}x below {other}", ratio, factor, ratio >= factor)
    if pa in table.get(1000, {}) and pa in table.get(10000, {}):
        ratio = table[10000][pa]["cpu_per_run_us"] / table[1000][pa]["cpu_per_run_us"]
        add("CPU/run at N=10000 <= 1.2x N=1000", ratio, 1.2, ratio <= 1.2)
    return out


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("parallel-async", "parallel-web", "aiohttp", "msgspec", "httpx", "anyio"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def report(settings: Settings, cells: list[Cell]) -> str:
    table = aggregate(cells)
    parts = [
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; spread {settings.spread[0]}-{settings.spread[1]} s, "
        f"medians of {settings.repeat} repeat(s)\n"
    ]
    parts += [markdown_table(table[n], n, settings.width) for n in sorted(table)]
    checks = verdicts(table)
    if checks:
        parts.append(
            "| target | measured | verdict |\n|---|---|---|\n"
            + "\n".join(
                f"| {c['target']} | {c['value']:.2f} | {'met' if c['met'] else 'MISSED'} |"
                for c in checks
            )
            + "\n"
        )
    failures = [c for c in cells if "error" in c]
    if failures:
        parts.append(
            "Failed cells:\n"
            + "\n".join(f"- {c['client']} N={c['n']}: {c['error']}" for c in failures)
            + "\n"
        )
    text = "\n".join(parts)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {
        "settings": {**settings.__dict__, "spread": list(settings.spread)},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "versions": _versions(),
        },
        "clients": {c: DESCRIPTIONS[c] for c in settings.clients},
        "cells": cells,
        "aggregate": {str(n): rows for n, rows in table.items()},
        "verdicts": checks,
    }
    (RESULTS / f"bench-{stamp}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"bench-{stamp}.md").write_text(text)
    return text


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000], help="run counts")
    parser.add_argument("--width", type=int, default=256, help="concurrency of every client")
    parser.add_argument(
        "--clients", nargs="+", choices=sorted(CLIENTS), default=list(ORDER), help="which clients"
    )
    parser.add_argument(
        "--spread",
        type=float,
        nargs=2,
        default=(0.5, 5.0),
        metavar=("MIN", "MAX"),
        help="runs complete uniformly between MIN and MAX seconds after the start",
    )
    parser.add_argument("--repeat", type=int, default=1, help="repeats per cell (medians)")
    parser.add_argument(
        "--sdk-defaults-max-n",
        type=int,
        default=1000,
        help="skip sdk-defaults for N above this (default 1000: at N=10,000 it runs for "
        "tens of minutes; pass 10000 to include it)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the children (results/profile-*)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test: N=300, 0.2-2 s spread")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.spread = [300], (0.2, 2.0)
    return Settings(
        ns=args.n,
        width=args.width,
        clients=args.clients,
        spread=(args.spread[0], args.spread[1]),
        repeat=args.repeat,
        sdk_defaults_max_n=args.sdk_defaults_max_n,
        profile=args.profile,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_args(argv)
    cells = asyncio.run(run_all(settings))
    print(report(settings, cells))


if __name__ == "__main__":
    main()

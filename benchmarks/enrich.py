"""Enrichment against ``map`` alone: CPU per row and peak memory, as ratios.

    python benchmarks/enrich.py [--rows 10000] [--repeat 3]

The fake server runs as its own process (``parallel-async fake-server``, runs of 0.2 to 1.5 s);
each measurement runs in a fresh process of its own:

* ``map``: ``client.map`` over the rows (the default group strategy), outcomes consumed;
* ``enrich``: ``client.enrich`` over the same rows with a journal, rows consumed in input order;
* ``enrich (resumed)``: the same job again: every row answered from the journal, no run;
* ``cli``: ``parallel-async enrich`` CSV to CSV, the whole process (imports included).

Measured in the child: CPU seconds (user + system, all threads) from just before the job to
its end (the ``cli`` line: of the whole process), wall time, and peak RSS (``VmHWM``). Medians of
``--repeat`` rounds; the ratios are against ``map``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"
FIELDS = "ceo: the CEO's full name, founded int: year founded, public bool"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rows(n: int) -> list[dict[str, str]]:
    return [{"company": f"Company {i}", "website": f"company{i}.example"} for i in range(n)]


async def _child(kind: str, url: str, rows: int, journal: str) -> dict[str, Any]:
    from parallel_async import AsyncParallel, output_spec

    spec = output_spec(FIELDS)
    data = _rows(rows)
    async with AsyncParallel(api_key=KEY, base_url=url, max_in_flight=100) as client:
        cpu, wall = _cpu(), time.monotonic()
        done = 0
        if kind == "map":
            async with client.map(data, processor="lite", task_spec=spec.task_spec) as outcomes:
                async for outcome in outcomes:
                    done += outcome.ok
        else:
            job = client.enrich(data, output=spec, processor="lite", journal=journal)
            async with job as results:
                async for row in results:
                    done += row["_status"] == "completed"
        return {
            "cpu": _cpu() - cpu,
            "wall": time.monotonic() - wall,
            "peak_mb": _peak_mb(),
            "completed": done,
        }


def _measure(kind: str, url: str, rows: int, workdir: Path, round_: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    journal = workdir / f"journal-{round_}.sqlite3"
    if kind == "cli":
        source = workdir / "in.csv"
        with source.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["company", "website"])
            writer.writerows([r["company"], r["website"]] for r in _rows(rows))
        code = (
            "import sys, resource; from parallel_async._cli import main; main(sys.argv[1:]); "
            "u = resource.getrusage(resource.RUSAGE_SELF); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
            "print(u.ru_utime + u.ru_stime, int(hwm.split()[1]) / 1024, file=sys.stderr)"
        )
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", code, "enrich", str(source), "-o", str(workdir / "out.csv"),
             "--fields", FIELDS, "--journal", str(workdir / f"cli-{round_}.sqlite3"), "--json"],
            env={**env, "PARALLEL_BASE_URL": url, "PARALLEL_API_KEY": KEY},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        cpu, peak = map(float, proc.stderr.split()[-2:])
        return {"cpu": cpu, "wall": time.monotonic() - started, "peak_mb": peak,
                "completed": rows}  # fmt: skip
    mode = "enrich" if kind.startswith("enrich") else "map"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--url", url, "--rows", str(rows),
         "--journal", str(journal)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return dict(json.loads(proc.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(args.child, args.url, args.rows, args.journal))))
        return

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "parallel_async", "fake-server", "--port", "0", "--api-key", KEY,
         "--duration", "0.2-1.5", "--seed", "1"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split("listening on ")[1].split()[0]
        results: dict[str, list[dict[str, Any]]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            for round_ in range(args.repeat):
                for kind in ("map", "enrich", "enrich (resumed)", "cli"):
                    result = _measure(kind, url, args.rows, workdir, round_)
                    assert result["completed"] == args.rows, (kind, result)
                    results.setdefault(kind, []).append(result)
    finally:
        server.terminate()
        server.communicate(timeout=10)

    def median(kind: str, key: str) -> float:
        return float(statistics.median(r[key] for r in results[kind]))

    base_cpu, base_mem = median("map", "cpu"), median("map", "peak_mb")
    print(f"{args.rows:,} rows, median of {args.repeat} rounds (fake server in its own process)")
    print(f"{'':18} {'CPU/row':>9} {'x map':>6} {'peak MB':>8} {'x map':>6} {'wall s':>7}")
    for kind in results:
        cpu, mem = median(kind, "cpu"), median(kind, "peak_mb")
        print(
            f"{kind:18} {cpu / args.rows * 1e6:7.0f}us {cpu / base_cpu:6.2f} "
            f"{mem:8.1f} {mem / base_mem:6.2f} {median(kind, 'wall'):7.2f}"
        )


if __name__ == "__main__":
    main()

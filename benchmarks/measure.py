"""One measurement, in its own process: ``python benchmarks/measure.py --client NAME ...``.

Protocol with the harness: the child imports its client's libraries, reads the run ids,
prints ``ready`` and waits for a line on stdin; the harness then schedules the runs'
completions on the server and sends ``go``. Only what follows is measured: CPU seconds
(user + system, ``getrusage(RUSAGE_SELF)``, all threads), wall time and the peak RSS of the
process image (``VmHWM``; the value at ``go`` is recorded too, so growth can be told from
interpreter + imports). Delivery lags are computed after the clock stops. The result is
written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import resource
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from clients import CLIENTS, Deliveries


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    """High-water RSS of this process image, MB.

    ``VmHWM`` from ``/proc/self/status``, not ``ru_maxrss``: on Linux ``ru_maxrss`` survives
    ``exec`` and so would report the (bigger) harness process that forked this child.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _parse_rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def _profile_report(profiler: cProfile.Profile, path: Path) -> None:
    profiler.dump_stats(str(path.with_suffix(".pstats")))
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(40)
    path.with_suffix(".txt").write_text(out.getvalue())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--client", choices=sorted(CLIENTS), required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--ids", type=Path, required=True, help="file with one run id a line")
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", type=Path, help="write cProfile stats to this path stem")
    args = parser.parse_args(argv)

    client = CLIENTS[args.client]
    if args.client == "parallel-async":
        import parallel_async  # noqa: F401  (import cost is not part of the measurement)
    elif args.client.startswith("sdk-"):
        import httpx  # noqa: F401
        import parallel  # noqa: F401
    else:
        import aiohttp  # noqa: F401
        import msgspec  # noqa: F401
    run_ids = args.ids.read_text().split()
    deliveries: Deliveries = []

    print("ready", flush=True)
    sys.stdin.readline()

    profiler = cProfile.Profile(time.process_time) if args.profile else None
    rss_at_go = _peak_rss_mb()
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    failed = asyncio.run(client(args.base_url, args.api_key, run_ids, args.width, deliveries))
    if profiler is not None:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    peak_rss = _peak_rss_mb()

    lags = [received - _parse_rfc3339(done) for done, received in deliveries if done]
    result: dict[str, Any] = {
        "client": args.client,
        "n": len(run_ids),
        "width": args.width,
        "completed": len(deliveries),
        "failed": failed,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_per_run_us": cpu / max(1, len(run_ids)) * 1e6,
        "peak_rss_mb": peak_rss,
        "rss_at_go_mb": rss_at_go,
        "lag_p50_ms": percentile(lags, 50) * 1e3,
        "lag_p99_ms": percentile(lags, 99) * 1e3,
        "lag_max_ms": max(lags, default=float("nan")) * 1e3,
        "profiled": profiler is not None,
    }
    if profiler is not None:
        _profile_report(profiler, args.profile)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()

"""Memory of a long lazy ``map``: RSS as outcomes stream by, per strategy.

    python benchmarks/memory.py [--n 100000] [--width 64]

The fake server runs in its own process (runs finish at once), so the figures are the client's
alone: RSS before the fan-out, after half the outcomes and at the end, and the growth per run.
Memory should stay flat (bounded by the width and the outcome buffer), not grow with N.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import psutil

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from parallel_async import AsyncParallel  # noqa: E402

SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from parallel_async.testing import FakeParallel, FakeServer

    async def main():
        fake = FakeParallel(api_key="bench-key")
        async with FakeServer(fake, "127.0.0.1", 0) as server:
            print(server.url, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    asyncio.run(main())
    """
)


def rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


async def measure(url: str, n: int, width: int, strategy: Literal["group", "poll"]) -> str:
    def inputs() -> Iterator[dict[str, str]]:
        for i in range(n):
            yield {"company": f"c{i}", "pad": "x" * 200}

    before = rss_mb()
    half = end = before
    seen = 0
    async with AsyncParallel(
        api_key="bench-key", base_url=url, max_in_flight=width, create_rate_limit=None
    ) as client:
        async with client.map(inputs(), processor="lite", strategy=strategy) as outcomes:
            async for _o in outcomes:
                seen += 1
                if seen == n // 2:
                    half = rss_mb()
        end = rss_mb()
    assert seen == n
    per_run = (end - half) * 2**20 / max(1, n - n // 2)
    return f"| {strategy} | {n:,} | {before:.0f} | {half:.0f} | {end:.0f} | {per_run:.0f} B |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--strategies", nargs="+", default=["group", "poll"])
    args = parser.parse_args()
    print("| strategy | N | RSS before (MB) | at N/2 | at N | growth per run, 2nd half |")
    print("|---|---|---|---|---|---|")
    for strategy in args.strategies:
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            url = server.stdout.readline().strip()
            print(asyncio.run(measure(url, args.n, args.width, strategy)), flush=True)
        finally:
            server.communicate("stop\n", timeout=30)


if __name__ == "__main__":
    main()

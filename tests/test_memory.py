"""Memory of a fan-out is bounded by its width and the outcome buffer, not by how many runs.

Counted as live objects of the engine's own types (no RSS: the fake server shares the
process), sampled near the end of a long lazy ``map`` whose outcomes are consumed and dropped.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Literal

import anyio
import pytest

from parallel_async import AsyncParallel
from parallel_async._ledger import Entry
from parallel_async.testing import FakeServer

pytestmark = pytest.mark.anyio

N = 6_000


def live_entries() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Entry)


@pytest.mark.parametrize("strategy", ["group", "poll"])
async def test_a_long_lazy_map_holds_only_runs_in_flight(
    fake_server: FakeServer, strategy: Literal["group", "poll"]
) -> None:
    width = 16
    seen = 0
    peak = 0

    def inputs() -> Iterator[dict[str, str]]:
        for i in range(N):
            yield {"company": f"c{i}", "pad": "x" * 200}  # inputs cost real memory

    async with AsyncParallel(
        api_key="test-key", base_url=fake_server.url, max_in_flight=width, create_rate_limit=None
    ) as client:
        async with client.map(inputs(), processor="lite", strategy=strategy) as outcomes:
            with anyio.fail_after(120):
                async for o in outcomes:
                    assert o.ok, o.error
                    seen += 1
                    if seen in (N // 2, N - 10):
                        peak = max(peak, live_entries())
    assert seen == N
    # in flight: at most one add batch (1,000) or the create workers, plus the poll width;
    # before the ledger forgot done runs, every one of the N records stayed alive
    assert peak <= 1_000 + 4 * width, peak

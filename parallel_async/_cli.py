"""The ``parallel-async`` command: ``demo`` and ``fake-server``."""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, TextIO

import anyio

from ._client import AsyncParallel
from ._progress import Progress
from ._version import __version__

__all__ = ["main"]

DEMO_SPEC = {
    "output_schema": {
        "type": "json",
        "json_schema": {
            "type": "object",
            "properties": {
                "founded": {"type": "integer", "description": "Year the company was founded"},
                "headquarters": {"type": "string", "description": "City of the headquarters"},
            },
            "required": ["founded", "headquarters"],
            "additionalProperties": False,
        },
    }
}


class ProgressLine:
    """A live one-line progress display (rewritten in place on a terminal, throttled)."""

    def __init__(self, stream: TextIO, interval: float = 0.1) -> None:
        self._stream = stream
        self._interval = interval
        self._last = 0.0
        self._tty = stream.isatty()

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        finished = p.total is not None and p.done >= p.total
        if now - self._last < (self._interval if self._tty else 2.0) and not finished:
            return
        self._last = now
        eta = f"{p.eta:5.1f}s" if p.eta is not None else "  ?  "
        line = (
            f"created {p.created:>5}  in flight {p.in_flight:>4}  done {p.done:>5}/{p.total or '?'}"
            f"  ok {p.completed:>5}  failed {p.failed:>3}  timed out {p.timed_out:>3}"
            f"  {p.rate:6.1f}/s  eta {eta}"
        )
        self._stream.write(("\r" + line) if self._tty else (line + "\n"))
        self._stream.flush()

    def close(self) -> None:
        """End the line."""
        if self._tty:
            self._stream.write("\n")


async def _fan_out(client: AsyncParallel, inputs: list[str], processor: str, out: TextIO) -> None:
    line = ProgressLine(sys.stderr)
    started = time.monotonic()
    outcomes: Counter[str] = Counter()
    sample: Any = None
    async with client.map(
        inputs, processor=processor, task_spec=DEMO_SPEC, progress=line, timeout=3600
    ) as results:
        async for o in results:
            if o.ok:
                outcomes["completed"] += 1
                if sample is None and o.result is not None:
                    sample = (o.input, o.result.output.content)
            else:
                outcomes[type(o.error).__name__] += 1
    line.close()
    wall = time.monotonic() - started
    out.write(f"{len(inputs)} runs in {wall:.2f} s ({len(inputs) / wall:.0f} runs/s)\n")
    for name, count in outcomes.most_common():
        out.write(f"  {name:<20} {count}\n")
    if sample is not None:
        out.write(f"  e.g. {sample[0]!r} -> {sample[1]}\n")


async def _demo_fake(runs: int, width: int, out: TextIO) -> None:
    from .testing import FakeParallel, FakeServer, RunPlan

    rng = random.Random(7)  # noqa: S311 - demo timings, not crypto

    def plan(body: dict[str, Any]) -> RunPlan:
        # Mostly quick runs, a tail of slow ones, and a few failures: what real fan-outs see.
        duration = rng.choice([0.3, 0.5, 0.8, 1.2, 2.0, 3.5])
        if rng.random() < 0.03:
            return RunPlan(duration=duration, outcome="failed", error_message="no sources found")
        return RunPlan(duration=duration)

    fake = FakeParallel(api_key="demo-key", plan=plan)
    async with FakeServer(fake) as server:
        out.write(
            f"parallel-async {__version__} demo: {runs} runs on the embedded fake Parallel "
            f"server at {server.url} (no API key used; pass --real for the real API)\n"
        )
        async with AsyncParallel(
            api_key="demo-key", base_url=server.url, max_in_flight=width
        ) as client:
            inputs = [f"Company #{i}" for i in range(runs)]
            await _fan_out(client, inputs, "lite", out)
        stats = fake.stats
        out.write(
            f"  server: {stats.runs_created} runs created in {stats.requests['group_add_runs']} "
            f"add request(s), {stats.requests['result']} /result requests, at most "
            f"{stats.max_open_connections} connections open at once "
            f"(max_in_flight {width} + 2)\n"
        )


async def _demo_real(runs: int, width: int, out: TextIO) -> None:
    if not os.environ.get("PARALLEL_API_KEY"):
        raise SystemExit("--real needs PARALLEL_API_KEY set")
    out.write(f"parallel-async {__version__} demo: {runs} real 'lite' runs on the Parallel API\n")
    companies = ["Parallel Web Systems", "Stripe", "Cloudflare", "Figma", "Datadog"]
    async with AsyncParallel(max_in_flight=width) as client:
        await _fan_out(client, companies[:runs], "lite", out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``parallel-async`` command."""
    parser = argparse.ArgumentParser(prog="parallel-async", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fan out runs on the embedded fake server (or --real)")
    demo.add_argument("--runs", type=int, default=200, help="runs to create (default 200)")
    demo.add_argument("--max-in-flight", type=int, default=64, help="fan-out width")
    demo.add_argument("--real", action="store_true", help="use the real API (a few lite runs)")
    fake = sub.add_parser("fake-server", help="serve the fake Parallel API")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8787)
    fake.add_argument("--api-key", default=None, help="accept only this key (default: any)")
    fake.add_argument("--duration", type=float, default=1.0, help="run duration, seconds")
    fake.add_argument("--max-long-poll", type=float, default=None, help="cap on /result holds")
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.runs < 1 or args.max_in_flight < 1:
            parser.error("--runs and --max-in-flight must be at least 1")
        if args.real:
            anyio.run(_demo_real, min(args.runs, 5), args.max_in_flight, sys.stdout)
        else:
            anyio.run(_demo_fake, args.runs, args.max_in_flight, sys.stdout)
        return 0
    from .testing import run_fake_server

    run_fake_server(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        duration=args.duration,
        max_long_poll=args.max_long_poll,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

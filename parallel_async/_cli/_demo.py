"""``parallel-async demo``: enrich a bundled sample of companies, on the embedded fake server
(no API key, nothing billed) or, with ``--real``, a few rows on the Parallel API."""

from __future__ import annotations

import csv
import io
import os
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any

import anyio

from .._client import AsyncParallel
from .._enrich import Enrichment, enrich
from .._fields import OutputSpec, output_spec
from .._version import __version__
from ._common import EXIT_OK, EXIT_USAGE, HelpFormatter
from ._tables import TableWriter
from ._views import choose_view

__all__ = ["add_parser", "sample_rows"]

FIELDS = (
    "ceo: the CEO's full name, founded int: year the company was founded, "
    "headquarters: city of the headquarters, employees int: approximate number of employees, "
    "public bool: whether its shares trade on a stock exchange"
)
REAL_ROWS = 5


def add_parser(sub: Any) -> None:
    """Register ``demo``."""
    p = sub.add_parser(
        "demo",
        help="enrich a bundled sample of companies on the embedded fake server (no key needed)",
        description="Enrich a bundled sample of companies with researched fields, on the "
        "embedded fake Parallel server: no API key, nothing billed. Shows the progress bar, "
        "then where the output and the journal are, then a second run answered from the "
        "journal alone.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--rows",
        "--runs",
        type=int,
        default=None,
        metavar="N",
        help="rows to enrich (default: the whole sample; more repeats it)",
    )
    p.add_argument("--max-in-flight", type=int, default=64, metavar="N", help="open requests")
    p.add_argument("--output", metavar="CSV", help="where to write (default: a temp directory)")
    p.add_argument(
        "--real",
        action="store_true",
        help=f"use the Parallel API (PARALLEL_API_KEY) for the first {REAL_ROWS} rows, lite",
    )
    p.set_defaults(handler=run)


def sample_rows(n: int | None = None) -> Iterator[dict[str, str]]:
    """The bundled sample (company, website, country); ``n`` beyond its size repeats it."""
    text = resources.files("parallel_async").joinpath("data/companies.csv").read_text("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    total = len(rows) if n is None else n
    for i in range(total):
        row = dict(rows[i % len(rows)])
        if i >= len(rows):
            row["company"] = f"{row['company']} #{i // len(rows) + 1}"
        yield row


def run(args: Any, argv: Any) -> int:
    """The ``demo`` command."""
    if (args.rows is not None and args.rows < 1) or args.max_in_flight < 1:
        sys.stderr.write("parallel-async: error: --rows and --max-in-flight must be >= 1\n")
        return EXIT_USAGE
    if args.real:
        if not os.environ.get("PARALLEL_API_KEY"):
            sys.stderr.write("parallel-async: error: --real needs PARALLEL_API_KEY set\n")
            return EXIT_USAGE
        return anyio.run(_demo_real, args)
    return anyio.run(_demo_fake, args)


def _output_path(args: Any) -> str:
    if args.output:
        return str(args.output)
    folder = tempfile.mkdtemp(prefix="parallel-async-demo-")
    return os.path.join(folder, "companies-enriched.csv")


async def _enrich_to(
    client: AsyncParallel, rows: list[dict[str, str]], spec: OutputSpec, out: str, processor: str
) -> Enrichment:
    view = choose_view(False, sys.stderr)
    writer = TableWriter(out, "csv", ["company", "website", "country"], spec)
    job = enrich(
        client,
        rows,
        output=spec,
        processor=processor,
        journal=out + ".journal.sqlite3",
        columns=["company", "website"],
        progress=view.update,
    )
    try:
        async with job as results:
            async for row in results:
                writer.write(row)
    except BaseException:
        writer.abort()
        raise
    finally:
        view.close()
    writer.commit()
    return job


async def _demo_fake(args: Any) -> int:
    from ..testing import FakeParallel, FakeServer, RunPlan

    rng = random.Random(7)  # noqa: S311 - demo timings, not crypto

    def plan(body: dict[str, Any]) -> RunPlan:
        # Mostly quick runs, a tail of slow ones, and a few failures: what real jobs see.
        duration = rng.choice([0.3, 0.5, 0.8, 1.2, 2.0, 3.5])
        if rng.random() < 0.03:
            return RunPlan(duration=duration, outcome="failed", error_message="no sources found")
        return RunPlan(duration=duration)

    rows = list(sample_rows(args.rows))
    spec = output_spec(FIELDS)
    out = _output_path(args)
    fake = FakeParallel(api_key="demo-key", plan=plan)
    try:
        async with FakeServer(fake) as server:
            print(
                f"parallel-async {__version__} demo: enriching {len(rows)} companies on the "
                f"embedded fake Parallel server at {server.url} (no API key used, nothing "
                "billed; --real uses the API)",
                flush=True,
            )
            async with AsyncParallel(
                api_key="demo-key", base_url=server.url, max_in_flight=args.max_in_flight
            ) as client:
                job = await _enrich_to(client, rows, spec, out, "lite")
                _report(job, out)
                stats = fake.stats
                print(
                    f"  server: {stats.runs_created} runs created (one per row) in "
                    f"{stats.requests['group_add_runs']} add request(s), "
                    f"{stats.requests['result']} result fetches"
                )
                started = time.monotonic()
                again = enrich(
                    client,
                    rows,
                    output=spec,
                    processor="lite",
                    journal=out + ".journal.sqlite3",
                    columns=["company", "website"],
                )
                await again
                s = again.summary
                assert s is not None  # noqa: S101
                print(
                    f"  run it again: {s.reused} rows answered from the journal, {s.created} "
                    f"runs created, in {time.monotonic() - started:.2f} s (a crash or Ctrl-C "
                    "resumes the same way)"
                )
    finally:
        fake.close()
    print(
        "  the same from the command line:\n    parallel-async enrich companies.csv -o "
        f'enriched.csv --columns company,website --fields "{FIELDS}"'
    )
    return EXIT_OK


def _report(job: Enrichment, out: str) -> None:
    s = job.summary
    assert s is not None  # noqa: S101
    print(
        f"{s.rows} rows in {s.elapsed:.2f} s: {s.completed} completed, {s.failed} failed "
        "(kept, marked in _status and _error)"
    )
    with open(out, encoding="utf-8", newline="") as f:
        first = next(csv.DictReader(f), None)
    if first is not None:
        shown = {k: v for k, v in first.items() if k not in ("_run_id", "_error")}
        print(f"  e.g. {shown}")
    print(f"  output:  {out}")
    journal = out + ".journal.sqlite3"
    query = "select status, count(*) from rows group by status"
    print(f"  journal: {journal}\n    (look inside: sqlite3 {shlex.quote(journal)} '{query}')")


async def _demo_real(args: Any) -> int:
    rows = list(sample_rows(min(args.rows or REAL_ROWS, REAL_ROWS)))
    spec = output_spec(FIELDS)
    out = _output_path(args)
    print(
        f"parallel-async {__version__} demo: enriching {len(rows)} companies on the Parallel "
        "API with the lite processor"
    )
    async with AsyncParallel(max_in_flight=args.max_in_flight) as client:
        job = await _enrich_to(client, rows, spec, out, "lite")
    _report(job, out)
    return EXIT_OK

"""``parallel-async enrich``: a table in, the same table with researched fields out."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import anyio

from .._client import AsyncParallel
from .._defaults import RECONCILE_SETTLE
from .._enrich import DEFAULT_WINDOW, enrich
from .._enrich_job import BadRecord
from .._enrich_output import EnrichSummary
from .._errors import InvalidArgumentError
from .._fields import RESERVED_COLUMNS, OutputSpec, job_fingerprint, row_key
from .._journal import Journal
from .._pricing import PRICES_AS_OF, load_prices, price_per_run
from .._task_group import MAX_RUNS_PER_ADD
from ._common import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    HelpFormatter,
    add_spec_options,
    spec_from,
)
from ._tables import FORMATS, TableReader, TableWriter, detect_format
from ._views import JsonView, View, choose_view

__all__ = ["add_parser", "run"]

DEFAULT_PROCESSOR = "lite"
STDOUT_JOURNAL = "parallel-async-journal.sqlite3"

EPILOG = """\
Run the same command again to resume: rows already answered are not asked again, rows with a
run are awaited, never re-created. Exit codes: 0 every row completed; 1 some rows did not
(each marked in _status and _error); 2 bad input or usage; 3 no or refused API key; 4 API
error; 5 the time (--timeout) ran out: run the command again; 130 interrupted.
"""


def add_parser(sub: Any) -> None:
    """Register ``enrich``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "enrich",
        help="add researched fields to every row of a CSV, JSONL or Parquet table",
        description="Enrich a table: one run per row, written back beside the row's columns. "
        "Output columns: the input's, unchanged and in order, then the fields, then "
        "_status, _error and _run_id.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="the table: .csv, .jsonl or .parquet, or -")
    p.add_argument("-o", "--output", required=True, help="where to write the enriched table")
    add_spec_options(p, required=True)
    p.add_argument("--processor", default=DEFAULT_PROCESSOR, help="the processor of every run")
    p.add_argument(
        "--journal",
        metavar="PATH",
        help="the SQLite journal that makes the job resumable (default: OUTPUT.journal.sqlite3, "
        f"or ./{STDOUT_JOURNAL} for -o -)",
    )
    p.add_argument("--columns", metavar="A,B", help="the columns each run reads (default: all)")
    p.add_argument(
        "--key", metavar="COLUMN", help="a column naming each row (default: the row's content)"
    )
    p.add_argument("--max-in-flight", type=int, default=100, metavar="N", help="open requests")
    p.add_argument(
        "--timeout", type=float, metavar="S", help="stop after S seconds (rows left: exit 5)"
    )
    p.add_argument("--retry-failed", action="store_true", help="send the failed rows again")
    p.add_argument(
        "--dry-run", action="store_true", help="count the rows, requests and cost; send nothing"
    )
    p.add_argument(
        "--max-cost", type=float, metavar="USD", help="refuse to start if the estimate is over"
    )
    p.add_argument("--prices", metavar="FILE", help='JSON {"processor": USD per 1,000 runs}')
    p.add_argument("--json", action="store_true", help="progress and summary as JSON lines")
    p.add_argument("--format", choices=FORMATS, help="the format of - (and of unknown names)")
    p.add_argument("--basis", metavar="FILE", help="write each row's basis here (JSON lines)")
    p.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        metavar="N",
        help="most rows read ahead of the oldest unfinished one (bounds memory)",
    )
    p.add_argument(
        "--reconcile-settle",
        type=float,
        default=RECONCILE_SETTLE,
        metavar="S",
        help="seconds a create whose answer was lost may take to show up before it is sent again",
    )
    p.set_defaults(handler=run)


def _formats(args: Any) -> tuple[str, str]:
    def of(path: str, fallback: str | None) -> str:
        if path == "-":
            return detect_format(path, args.format or fallback)
        try:
            return detect_format(path, None)
        except InvalidArgumentError:
            if args.format or fallback:
                return str(args.format or fallback)
            raise

    in_fmt = of(args.input, None)
    return in_fmt, of(args.output, in_fmt)


def _check(args: Any, spec: OutputSpec, columns: list[str] | None, key: str | None) -> None:
    if args.max_in_flight < 1 or args.window < 1:
        raise InvalidArgumentError("--max-in-flight and --window must be at least 1")
    if args.timeout is not None and not args.timeout > 0:
        raise InvalidArgumentError("--timeout must be a positive number of seconds")
    if args.reconcile_settle < 0:
        raise InvalidArgumentError("--reconcile-settle must be >= 0")
    if args.max_cost is not None and args.max_cost < 0:
        raise InvalidArgumentError("--max-cost must be >= 0")
    if columns is not None:
        clash = [c for c in (*spec.names, *RESERVED_COLUMNS) if c in columns]
        if clash:
            raise InvalidArgumentError(
                f"{args.input} already has column(s) {', '.join(map(repr, clash))}: rename the "
                "output field(s); input columns are never overwritten"
            )
        wanted = [*(args.columns_list or ()), *([key] if key else [])]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise InvalidArgumentError(
                f"{args.input} has no column(s) {', '.join(map(repr, missing))}; its columns: "
                f"{', '.join(columns)}"
            )


def run(args: Any, argv: Sequence[str]) -> int:
    """The ``enrich`` command."""
    spec = spec_from(args)
    assert spec is not None  # noqa: S101 - required
    args.columns_list = (
        None if args.columns is None else [c.strip() for c in args.columns.split(",") if c.strip()]
    )
    if args.columns is not None and not args.columns_list:
        raise InvalidArgumentError("--columns names no column")
    in_fmt, out_fmt = _formats(args)
    journal = args.journal or (
        STDOUT_JOURNAL if args.output == "-" else f"{args.output}.journal.sqlite3"
    )
    prices = load_prices(args.prices) if (args.dry_run or args.max_cost is not None) else None
    spool = None
    if args.input == "-" and (args.dry_run or args.max_cost is not None):
        spool = tempfile.mkdtemp(prefix="parallel-async-")  # read stdin twice: keep it
        path = os.path.join(spool, f"input.{in_fmt}")
        with open(path, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f)
        args.input = path
    try:
        if args.dry_run or args.max_cost is not None:
            assert prices is not None  # noqa: S101
            plan = _plan(args, spec, in_fmt, journal, prices)
            if args.dry_run:
                _print_plan(args, plan, spec, journal)
                return EXIT_OK
            cost = plan["cost"]
            if cost is None:
                raise InvalidArgumentError(
                    f"no price is known for processor {args.processor!r}: give --prices FILE "
                    "to use --max-cost"
                )
            if cost > args.max_cost:
                raise InvalidArgumentError(
                    f"the estimate is ${cost:,.2f} for {plan['to_create']:,} runs, over "
                    f"--max-cost ${args.max_cost:,.2f}; nothing was sent"
                )
        return anyio.run(_enrich, args, argv, spec, (in_fmt, out_fmt), journal)
    finally:
        if spool is not None:
            shutil.rmtree(spool, ignore_errors=True)


async def _enrich(
    args: Any, argv: Sequence[str], spec: OutputSpec, formats: tuple[str, str], journal: str
) -> int:
    json_out: TextIO = sys.stderr if args.output == "-" else sys.stdout
    view = choose_view(args.json, json_out if args.json else sys.stderr)
    source = args.input

    def bad(line: int, message: str) -> None:
        view.note(
            "malformed",
            f"{source}:{line}: {message}; the row is marked failed and the job goes on",
            line=line,
        )

    in_fmt, out_fmt = formats
    reader = TableReader(args.input, in_fmt, bad)
    interrupted = False
    try:
        _check(args, spec, reader.columns, args.key)
        writer = TableWriter(args.output, out_fmt, reader.columns, spec, reader.arrow_schema)
        try:
            async with AsyncParallel(max_in_flight=args.max_in_flight) as client:
                client.task_group.reconcile_settle = args.reconcile_settle
                job = enrich(
                    client,
                    reader.records(),
                    output=spec,
                    processor=args.processor,
                    journal=journal,
                    columns=args.columns_list,
                    key=args.key,
                    timeout=args.timeout,
                    retry_failed=args.retry_failed,
                    progress=view.update,
                    basis=args.basis,
                    window=args.window,
                )
                with anyio.CancelScope() as scope, _stop_on_signal(scope):
                    async with job as rows:
                        async for row in rows:
                            writer.write(row)
                interrupted = scope.cancelled_caught
        except BaseException:
            writer.abort()
            raise
        if interrupted:
            writer.abort()
        else:
            writer.commit()
    finally:
        view.close()
        reader.close()
    summary = job.summary
    assert summary is not None  # noqa: S101
    return _finish(args, argv, view, summary, journal=journal, interrupted=interrupted)


@contextlib.contextmanager
def _stop_on_signal(scope: anyio.CancelScope) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) stops the job; what finished is already in the journal. A second
    Ctrl-C while it winds down is Python's own KeyboardInterrupt."""
    loop = asyncio.get_running_loop()
    signums = (signal.SIGINT, signal.SIGTERM)
    installed = []
    for signum in signums:
        try:
            loop.add_signal_handler(signum, _stop, loop, scope, signum)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not main thread
            continue
        installed.append(signum)
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def _stop(loop: asyncio.AbstractEventLoop, scope: anyio.CancelScope, signum: int) -> None:
    scope.cancel()
    loop.remove_signal_handler(signum)  # the next one is not ours to soften


def _resume_command(argv: Sequence[str]) -> str:
    return shlex.join(["parallel-async", *argv])


def _finish(
    args: Any,
    argv: Sequence[str],
    view: View,
    s: EnrichSummary,
    *,
    journal: str,
    interrupted: bool,
) -> int:
    if interrupted:
        code = EXIT_INTERRUPTED
    elif not s.finished:
        code = EXIT_TIMEOUT
    elif s.failed:
        code = EXIT_INCOMPLETE
    else:
        code = EXIT_OK
    where = "stdout" if args.output == "-" else args.output
    resume = _resume_command(argv)
    if args.input == "-":
        resume += "   (with the same input on stdin)"
    if isinstance(view, JsonView):
        view.emit(
            {
                "event": "summary",
                "rows": s.rows,
                "completed": s.completed,
                "failed": s.failed,
                "running": s.running,
                "pending": s.pending,
                "reused": s.reused,
                "created": s.created,
                "output": None if interrupted else where,
                "journal": journal,
                "group_id": s.group_id,
                "elapsed": round(s.elapsed, 3),
                "exit_code": code,
                "resume": resume if code in (EXIT_TIMEOUT, EXIT_INTERRUPTED) else None,
            }
        )
        return code
    out = sys.stderr
    if interrupted:
        out.write(
            f"interrupted: {s.completed + s.failed} rows finished and are saved in the journal "
            f"{journal}; {args.output} was not written. Resume with:\n  {resume}\n"
        )
        return code
    out.write(
        f"{s.rows} rows -> {where}: {s.completed} completed, {s.failed} failed"
        + (" (marked in _status and _error)" if s.failed else "")
        + f"; {s.created} runs created, {s.reused} rows answered from the journal {journal}\n"
    )
    if code == EXIT_TIMEOUT:
        out.write(
            f"time ran out: {s.running} rows still running and {s.pending} not sent yet (marked "
            f"in _status). Run the same command again to pick them up:\n  {resume}\n"
        )
    return code


# --- dry run and cost ---------------------------------------------------------------------------


def _plan(
    args: Any, spec: OutputSpec, in_fmt: str, journal: str, prices: dict[str, float]
) -> dict[str, Any]:
    """Count what a run of this command would do, from the input and the journal."""
    bad_lines: list[int] = []
    reader = TableReader(args.input, in_fmt, lambda line, message: bad_lines.append(line))
    try:
        _check(args, spec, reader.columns, args.key)
        counts = anyio.run(_count, args, spec, reader.records(), journal)
    finally:
        reader.close()
    per_run = price_per_run(args.processor, prices)
    counts["cost"] = None if per_run is None else counts["to_create"] * per_run
    counts["price_per_run"] = per_run
    counts["unreadable"] = len(bad_lines)
    return counts


async def _count(
    args: Any, spec: OutputSpec, records: Iterator[Any], journal_path: str
) -> dict[str, Any]:
    columns = args.columns_list
    fp = job_fingerprint(spec, args.processor, columns)
    counts: dict[str, Any] = dict.fromkeys(
        ("rows", "invalid", "answered", "failed", "running", "to_create"), 0
    )
    exists = await anyio.Path(journal_path).exists()
    journal = await Journal.open(journal_path, create=False) if exists else None
    has_group = False
    try:
        if journal is not None:
            job = await journal.job(fp, processor=args.processor, schema=spec.schema,
                                    columns=columns, key_column=args.key, create=False)  # fmt: skip
            has_group = job is not None and job.group_id is not None
        seen: set[str] = set()
        chunk: list[str] = []

        async def flush() -> None:
            known = await journal.lookup(fp, chunk) if journal is not None else {}
            for key in chunk:
                rec = known.get(key)
                if rec is None:
                    counts["to_create"] += 1
                elif rec.status == "completed":
                    counts["answered"] += 1
                elif rec.status == "failed":
                    counts["to_create" if args.retry_failed else "failed"] += 1
                else:
                    counts["running"] += 1
            chunk.clear()

        for record in records:
            counts["rows"] += 1
            if isinstance(record, BadRecord):
                counts["invalid"] += 1
                continue
            try:
                key = row_key(record, fingerprint=fp, key=args.key, columns=columns)
            except InvalidArgumentError:
                counts["invalid"] += 1
                continue
            if key in seen:
                continue  # the same row again: one run answers both
            seen.add(key)
            chunk.append(key)
            if len(chunk) >= 500:
                await flush()
        await flush()
    finally:
        if journal is not None:
            await journal.close()
    adds = math.ceil(counts["to_create"] / MAX_RUNS_PER_ADD)
    counts["requests"] = {
        "group_create": 1 if counts["to_create"] and not has_group else 0,
        "add_runs": adds,
        "results": counts["to_create"] + counts["running"],
    }
    return counts


def _print_plan(args: Any, plan: dict[str, Any], spec: OutputSpec, journal: str) -> None:
    if args.json:
        sys.stdout.write(
            json.dumps(
                {
                    "event": "dry_run",
                    **plan,
                    "processor": args.processor,
                    "prices_as_of": PRICES_AS_OF,
                    "journal": journal,
                    "schema": spec.schema,
                }
            )
            + "\n"
        )
        return
    requests = plan["requests"]
    per_run = plan["price_per_run"]
    if plan["cost"] is None:
        cost = f"unknown (no price for {args.processor!r}; give --prices FILE)"
    else:
        cost = (
            f"${plan['cost']:,.2f} ({plan['to_create']:,} runs x {args.processor} at "
            f"${per_run * 1000:,.2f} per 1,000, prices of {PRICES_AS_OF}; only completed runs "
            "are billed)"
        )
    sys.stdout.write(
        f"dry run: nothing was sent\n"
        f"rows: {plan['rows']:,} ({plan['invalid']:,} unreadable or without a key)\n"
        f"answered in the journal {journal}: {plan['answered']:,}; failed there: "
        f"{plan['failed']:,}; running (awaited, never re-created): {plan['running']:,}\n"
        f"runs to create: {plan['to_create']:,}\n"
        f"requests: {requests['group_create']} group create, {requests['add_runs']:,} add "
        f"request(s) of up to {MAX_RUNS_PER_ADD:,} runs, {requests['results']:,} result fetches\n"
        f"estimated cost: {cost}\n"
        f"output schema:\n{json.dumps(spec.schema, indent=2)}\n"
    )

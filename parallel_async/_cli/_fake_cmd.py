"""``parallel-async fake-server``: serve the fake Parallel API for any client."""

from __future__ import annotations

import errno
import json
import random
import socket
import sys
from typing import IO, Any

from ._common import EXIT_OK, EXIT_USAGE, HelpFormatter

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    """Register ``fake-server``."""
    p = sub.add_parser(
        "fake-server",
        help="serve the fake Parallel API (for tests, demos and other clients)",
        description="Serve the fake Parallel Task API until Ctrl-C. Point a client at it with "
        "PARALLEL_BASE_URL=http://HOST:PORT and any PARALLEL_API_KEY.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind")
    p.add_argument("--port", type=int, default=8787, help="port to bind (0: any free one)")
    p.add_argument("--api-key", default=None, help="accept only this key (default: any)")
    p.add_argument(
        "--duration",
        default="1.0",
        metavar="S|MIN-MAX",
        help="seconds from a run's creation to its end; a range picks one per run",
    )
    p.add_argument(
        "--failure-rate", type=float, default=0.0, metavar="P", help="share of runs that fail"
    )
    p.add_argument(
        "--drop-after-create",
        type=float,
        default=0.0,
        metavar="P",
        help="share of creates and adds that are processed, then lose their answer "
        "(the connection is dropped)",
    )
    p.add_argument(
        "--add-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds an add of runs to a group takes before its runs exist (it goes on if "
        "the client hangs up)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument(
        "--request-log", metavar="FILE", help="one JSON line per request handled (- for stdout)"
    )
    p.add_argument("--max-long-poll", type=float, metavar="S", help="cap on /result holds")
    p.set_defaults(handler=run)


def _durations(text: str) -> tuple[float, float]:
    low, sep, high = text.partition("-")
    try:
        lo = float(low)
        hi = float(high) if sep else lo
    except ValueError:
        raise ValueError(f"--duration must be seconds or MIN-MAX, not {text!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"--duration must be 0 <= MIN <= MAX, not {text!r}")
    return lo, hi


def run(args: Any, argv: Any) -> int:
    """The ``fake-server`` command."""
    from ..testing import FakeParallel, Fault, RunPlan, run_fake_server

    try:
        low, high = _durations(args.duration)
    except ValueError as exc:
        sys.stderr.write(f"parallel-async: error: {exc}\n")
        return EXIT_USAGE
    for name in ("failure_rate", "drop_after_create"):
        if not 0 <= getattr(args, name) <= 1:
            option = "--" + name.replace("_", "-")
            sys.stderr.write(f"parallel-async: error: {option} must be between 0 and 1\n")
            return EXIT_USAGE
    if not _port_free(args.host, args.port):
        sys.stderr.write(
            f"parallel-async: error: port {args.port} on {args.host} is in use: stop what uses "
            "it, or pick another with --port (0 picks a free one)\n"
        )
        return EXIT_USAGE
    rng = random.Random(args.seed)  # noqa: S311 - fake timings, not crypto

    def plan(body: dict[str, Any]) -> RunPlan:
        duration = low if low == high else rng.uniform(low, high)
        if args.failure_rate and rng.random() < args.failure_rate:
            return RunPlan(duration=duration, outcome="failed", error_message="no sources found")
        return RunPlan(duration=duration)

    fake = FakeParallel(
        api_key=args.api_key, plan=plan, max_long_poll=args.max_long_poll, seed=args.seed
    )
    if args.add_delay < 0:
        sys.stderr.write("parallel-async: error: --add-delay must be >= 0\n")
        return EXIT_USAGE
    fake.group_store.add_delay = args.add_delay
    if args.drop_after_create:
        p = args.drop_after_create
        fake.faults.probabilities("create", {Fault.drop_after(): p})
        fake.faults.probabilities("group_add_runs", {Fault.drop_after(): p})
    log: IO[str] | None = None
    if args.request_log:
        log = sys.stdout if args.request_log == "-" else open(args.request_log, "a")  # noqa: SIM115

        def write(entry: dict[str, Any]) -> None:
            assert log is not None  # noqa: S101
            log.write(json.dumps(entry) + "\n")
            log.flush()

        fake.request_log = write
    try:
        run_fake_server(fake=fake, host=args.host, port=args.port)
    finally:
        if log is not None and log is not sys.stdout:
            log.close()
    stats = fake.stats
    print(
        f"served {sum(stats.requests.values())} requests; created {stats.runs_created} runs",
        flush=True,
    )
    return EXIT_OK


def _port_free(host: str, port: int) -> bool:
    if port == 0:
        return True
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return exc.errno != errno.EADDRINUSE
    return True

"""Waiters woken by webhooks: ``result()`` of runs created with a webhook, against polling.

    python benchmarks/webhook_waiters.py [--parts A B C] [--n 1000] [--width 50]
                                         [--poll-after 5 12] [--drop 0.1]

Only the public API is measured. The fake server runs in its own process (``server.py
--control``, driven over a pipe, so every TCP connection it counts is the client's; it signs
its webhook deliveries with the secret the client is given). The client runs in another,
started fresh for each part, with an ``aiohttp.web`` receiver on 127.0.0.1 serving
``client.webhooks.aiohttp_handler()``: ONE ``AsyncParallel(max_in_flight=--width,
webhook_secret=...)``, and ``--n`` (1,000) handlers started together at ``go``, each doing
``run = await client.task_run.create(..., webhook={"url": <receiver>})`` then
``await client.task_run.result(run.run_id)``, as a web app's endpoint would. Each run lasts a
seeded 1-10 s from its creation (the fake completes it by itself: ``duration=`` in its input).

- **A. Webhooks.** Every delivery arrives; ``client.webhooks.poll_after`` is left at its
  default (30 s, longer than any run), so no waiter should poll.
- **B. Lost webhooks.** ``--drop`` (10 %) of the deliveries are never sent (the fake's
  ``"webhook"`` fault ``Fault.drop()``, scripted: exactly that share, at seeded places in
  completion order), once per ``--poll-after`` value (5 s, then 12 s). From ``poll_after``
  after its create, a run's status is checked every ``poll_after`` (never polled: its webhook
  is due only once it has ended); a check that finds it ended fetches the result. At 5 s that
  checks every run still going at 5 s; at 12 s (longer than any run) only the lost ones.
  Lost and delivered runs are reported apart.
- **C. No webhook.** The same handlers create their runs without a webhook: the result hub
  polls (the comparison for what webhooks buy).

Reported per part: whether every handler got its own result exactly once; delivery lag (the
handler's ``time.time()`` when ``result()`` returned minus the run's ``modified_at``, when the
server completed it; same machine, same clock) p50/p99/max; ``/result`` requests per run
(``Stats.requests["result"]`` / n, and ``Stats.result_requests_by_run``), status checks
(``GET`` of the run) and 408s; the most TCP connections the server saw open at once; the
webhook deliveries (server side) and the events the receiver passed on; CPU and wall time.

Measures the ``parallel_async`` of the tree this file is in. Prints markdown; writes JSON to
``benchmarks/results/webhook-waiters-<timestamp>.json``. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Measure this tree's parallel_async, here and in every child process (server, client).
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
)

from measure import _cpu_seconds, _parse_rfc3339, percentile  # noqa: E402
from server import API_KEY, ControlledServer  # noqa: E402
from webapp import Child, _commit, _deliveries  # noqa: E402

RESULTS = HERE / "results"
CHILD_TIMEOUT = 600.0
SECRET = "whsec_YmVuY2gtd2ViaG9vay1zZWNyZXQ="  # noqa: S105 - the benchmark's own, base64 form
PATH = "/webhooks/parallel"

Record = dict[str, Any]


# --- client process -----------------------------------------------------------------------------


async def _client_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Receiver and client up, ``ready``, wait for ``go``, then the handlers; measurements."""
    from aiohttp import web

    from parallel_async import AsyncParallel, TaskRunStatusEvent
    from parallel_async.webhooks import WebhookEvent

    events: Counter[str] = Counter()
    durations: list[float] = spec["durations"]
    records: list[Record] = [{"want": None, "duration": d} for d in durations]
    delivered: list[int] = []
    async with AsyncParallel(
        api_key=API_KEY,
        base_url=spec["url"],
        max_in_flight=spec["width"],
        webhook_secret=SECRET,
    ) as client:
        if spec["poll_after"] is not None:
            client.webhooks.poll_after = spec["poll_after"]
        poll_after = client.webhooks.poll_after

        @client.webhooks.on_event
        def count(event: WebhookEvent) -> None:
            ok = isinstance(event, TaskRunStatusEvent)
            events["task_run.status" if ok else event.type] += 1

        app = web.Application()
        app.router.add_post(PATH, client.webhooks.aiohttp_handler())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        webhook = {"url": f"http://127.0.0.1:{port}{PATH}"} if spec["webhook"] else None

        async def handler(i: int, seconds: float) -> None:
            record = records[i]
            try:
                run = await client.task_run.create(
                    input=f"webhook waiter {i} duration={seconds:.3f}",
                    processor="lite",
                    webhook=webhook,
                )
                record["want"] = run.run_id
                record["created"] = time.time()  # ~ when the client's safety-net timer started
                result = await client.task_run.result(run.run_id)
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"[:300]
                return
            received = time.time()
            delivered.append(i)
            record["got"] = result.run.run_id
            record["received"] = received
            if result.run.modified_at is not None:
                record["lag"] = received - _parse_rfc3339(result.run.modified_at)

        try:
            print("ready", flush=True)
            sys.stdin.readline()  # blocks the loop, which has nothing to do before ``go``
            cpu0, wall0, t0 = _cpu_seconds(), time.perf_counter(), time.time()
            await asyncio.gather(*(handler(i, d) for i, d in enumerate(durations)))
            cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
        finally:
            await runner.cleanup()
    return {
        "records": records,
        "delivered": delivered,
        "events": dict(events),
        "cpu_s": cpu,
        "wall_s": wall,
        "t0": t0,
        "poll_after": poll_after,
    }


def child_main(spec_path: Path) -> None:
    """The client process: runs ``_client_main`` and writes its measurements as JSON."""
    spec = json.loads(spec_path.read_text())
    out = asyncio.run(_client_main(spec))
    Path(spec["out"]).write_text(json.dumps(out))


# --- harness ------------------------------------------------------------------------------------


def _lags(records: Sequence[Record]) -> dict[str, float]:
    """p50 / p99 / max of the records' lags, ms, and how many records had one."""
    lags = [r["lag"] for r in records if "lag" in r]
    return {
        "n": len(lags),
        "p50": percentile(lags, 50) * 1e3,
        "p99": percentile(lags, 99) * 1e3,
        "max": max(lags, default=float("nan")) * 1e3,
    }


def _per_run(records: Sequence[Record], by_run: dict[str, int]) -> float:
    """Mean ``/result`` requests per run of ``records`` (from the server's per-run counts)."""
    ids = [r["want"] for r in records if r["want"] is not None]
    return sum(by_run.get(i, 0) for i in ids) / max(1, len(ids))


async def run_part(
    part: str, args: argparse.Namespace, workdir: Path, poll_after: float | None = None
) -> dict[str, Any]:
    """One part: a fresh server and client process, the handlers, the server's counters.

    ``poll_after`` (B): ``client.webhooks.poll_after``; ``None`` leaves the library's default.
    """
    n = args.n
    rng = random.Random(f"webhook-waiters-{args.seed}")
    durations = [rng.uniform(*args.durations) for _ in range(n)]
    async with ControlledServer(webhook_secret=SECRET) as server:
        drops = 0
        if part == "B":
            drops = round(args.drop * n)
            script = ["drop"] * drops + ["ok"] * (n - drops)
            random.Random(f"drops-{args.seed}").shuffle(script)
            await server.faults("webhook", script=script)
        spec = {
            "part": part,
            "url": server.url,
            "width": args.width,
            "durations": durations,
            "webhook": part != "C",
            "poll_after": poll_after,
        }
        async with Child(
            spec, workdir, script=__file__, label=str(spec["part"]), timeout=CHILD_TIMEOUT
        ) as child:
            await server.reset()
            await child.go()
            out = await child.result()
        stats = await server.stats()
        hooks = await server.webhooks()
    records: list[Record] = out["records"]
    by_run: dict[str, int] = stats["result_requests_by_run"]
    lost_ids = set(hooks["lost_run_ids"])
    lost = [r for r in records if r["want"] in lost_ids]
    told = [r for r in records if r["want"] not in lost_ids]
    requests: dict[str, int] = stats["requests"]
    result: dict[str, Any] = {
        "part": part,
        "label": part if poll_after is None else f"{part}{poll_after:g}",
        "n": n,
        "width": args.width,
        "durations_s": list(args.durations),
        "webhook": spec["webhook"],
        "poll_after_s": out["poll_after"],  # as the client had it
        "webhooks_dropped": drops,
        "deliveries": _deliveries(out, n),
        "lag_ms": _lags(records),
        "result_requests": requests.get("result", 0),
        "result_requests_per_run": requests.get("result", 0) / n,
        "result_requests_max_one_run": max(by_run.values(), default=0),
        "runs_with_more_than_one_result": sum(1 for v in by_run.values() if v > 1),
        "status_checks": requests.get("retrieve", 0),
        "status_checks_per_run": requests.get("retrieve", 0) / n,
        "timeouts_408": stats["statuses"].get("408", 0),
        "creates": requests.get("create", 0),
        "requests": requests,
        "max_open_connections": stats["max_open_connections"],
        "connections_total": stats["connections_total"],
        "webhook_deliveries": {k: v for k, v in hooks.items() if not k.endswith("run_ids")},
        "webhook_events_received": out["events"],
        "wall_s": out["wall_s"],
        "cpu_s": out["cpu_s"],
        "cpu_per_run_us": out["cpu_s"] / n * 1e6,
        "t0": out["t0"],
        "records": [
            {**r, "lost": r["want"] in lost_ids, "result_requests": by_run.get(r["want"], 0)}
            for r in records
        ],
    }
    if part == "B":
        safety = out["poll_after"]
        short = [r for r in lost if r["duration"] < safety]
        result.update(
            delivered_lag_ms=_lags(told),
            lost_lag_ms=_lags(lost),
            lost_short_lag_ms=_lags(short),
            lost_long_lag_ms=_lags([r for r in lost if r["duration"] >= safety]),
            lost_after_safety_net_ms=_lags(
                [{"lag": r["received"] - r["created"] - safety} for r in short if "lag" in r]
            ),
            delivered_result_requests_per_run=_per_run(told, by_run),
            lost_result_requests_per_run=_per_run(lost, by_run),
        )
    return result


# --- report -------------------------------------------------------------------------------------


def _ms(lags: dict[str, float]) -> str:
    if not lags["n"]:
        return "—"
    return f"{lags['p50']:.0f} / {lags['p99']:.0f} / {lags['max']:.0f}"


def _once(d: dict[str, Any]) -> str:
    text = (
        f"{d['delivered_exactly_once']} / {d['handlers']} (wrong run {d['wrong_run']}, "
        f"twice {d['delivered_twice_or_more']}, errors {d['errors']})"
    )
    return text + (f" e.g. {d['first_errors'][0]}" if d["first_errors"] else "")


def _title(r: dict[str, Any]) -> str:
    if r["part"] == "A":
        return "A. Webhooks, all delivered"
    if r["part"] == "B":
        return f"B. {r['webhooks_dropped']} webhooks lost, `poll_after` {r['poll_after_s']:g} s"
    return "C. No webhook (the hub polls)"


def report(results: Sequence[dict[str, Any]]) -> str:
    """One markdown table, a column per part."""
    parts = {r["part"]: r for r in results}

    def row(label: str, fn: Any, target: str = "") -> str:
        return f"| {label} | " + " | ".join(fn(r) for r in results) + f" | {target} |"

    def b_only(fn: Any) -> Any:
        return lambda r: fn(r) if r["part"] == "B" else "—"

    lines = [
        "| measure | " + " | ".join(_title(r) for r in results) + " | target |",
        "|---|" + "---|" * len(results) + "---|",
        row("runs created with a webhook", lambda r: "yes" if r["webhook"] else "no"),
        row("`webhooks.poll_after` (s)",
            lambda r: f"{r['poll_after_s']:g}" if r["webhook"] else "—"),
        row("webhooks never delivered", lambda r: str(r["webhooks_dropped"])),
        row("handlers with their own result, exactly once", lambda r: _once(r["deliveries"]),
            "all"),
        row("lag p50 / p99 / max (ms), all runs", lambda r: _ms(r["lag_ms"]),
            "p99 <= 500 (A)"),
        row("lag p50 / p99 / max (ms), runs told by webhook",
            b_only(lambda r: _ms(r["delivered_lag_ms"]))),
        row("lag p50 / p99 / max (ms), lost webhooks",
            b_only(lambda r: f"{_ms(r['lost_lag_ms'])} ({r['lost_lag_ms']['n']} runs)")),
        row("… of which runs shorter than `poll_after`",
            b_only(lambda r: f"{_ms(r['lost_short_lag_ms'])} "
                             f"({r['lost_short_lag_ms']['n']} runs)")),
        row("… their result after the safety net fired (ms)",
            b_only(lambda r: _ms(r["lost_after_safety_net_ms"]))),
        row("… of which runs longer than `poll_after`",
            b_only(lambda r: f"{_ms(r['lost_long_lag_ms'])} ({r['lost_long_lag_ms']['n']} runs)")),
        row("`/result` requests: total, per run",
            lambda r: f"{r['result_requests']}, {r['result_requests_per_run']:.2f}",
            "<= 1.3 per run (A)"),
        row("`/result` per run: told / lost",
            b_only(lambda r: f"{r['delivered_result_requests_per_run']:.2f} / "
                             f"{r['lost_result_requests_per_run']:.2f}")),
        row("`/result` most on one run; runs with more than one",
            lambda r: f"{r['result_requests_max_one_run']}; "
                      f"{r['runs_with_more_than_one_result']}"),
        row("408 answers", lambda r: str(r["timeouts_408"])),
        row("status checks (`GET` run), per run",
            lambda r: f"{r['status_checks']}, {r['status_checks_per_run']:.2f}"),
        row("connections: most open at once; opened in all (server)",
            lambda r: f"{r['max_open_connections']}; {r['connections_total']}",
            f"<= {results[0]['width'] + 2} open"),
        row("webhooks: delivered / lost (server); events received (client)",
            lambda r: f"{r['webhook_deliveries']['states'].get('delivered', 0)} / "
                      f"{r['webhook_deliveries']['states'].get('lost', 0)}; "
                      f"{sum(r['webhook_events_received'].values())}"),
        row("wall s; CPU µs per run (client)",
            lambda r: f"{r['wall_s']:.1f}; {r['cpu_per_run_us']:.0f}"),
    ]  # fmt: skip
    if "A" in parts and "C" in parts:
        a, c = parts["A"], parts["C"]
        lines += [
            "",
            "| what webhooks buy (C / A) | ratio |",
            "|---|---|",
            f"| lag p50 | {c['lag_ms']['p50'] / a['lag_ms']['p50']:.1f}x |",
            f"| lag p99 | {c['lag_ms']['p99'] / a['lag_ms']['p99']:.1f}x |",
            "| `/result` requests per run | "
            f"{c['result_requests_per_run'] / max(a['result_requests_per_run'], 1e-9):.2f}x |",
            f"| requests per run, creates excluded | {_reads(c) / max(_reads(a), 1e-9):.2f}x |",
            f"| client CPU per run | {c['cpu_per_run_us'] / a['cpu_per_run_us']:.2f}x |",
        ]
    return "\n".join(lines)


def _reads(r: dict[str, Any]) -> float:
    requests: dict[str, int] = r["requests"]
    return sum(v for k, v in requests.items() if k != "create") / float(r["n"])


def verdicts(results: Sequence[dict[str, Any]]) -> list[str]:
    """The issue's targets, met or missed."""
    out = []
    for r in results:
        d = r["deliveries"]
        every = d["delivered_exactly_once"] == d["handlers"] and d["wrong_run"] == 0
        out.append(f"- {r['label']}: every waiter got its result exactly once: "
                   f"**{'met' if every else 'MISSED'}**")  # fmt: skip
        if r["part"] == "A":
            p99, per_run = r["lag_ms"]["p99"], r["result_requests_per_run"]
            out.append(f"- A: lag p99 {p99:.0f} ms <= 500 ms: "
                       f"**{'met' if p99 <= 500 else 'MISSED'}**")  # fmt: skip
            out.append(f"- A: {per_run:.2f} `/result` per run <= 1.3: "
                       f"**{'met' if per_run <= 1.3 else 'MISSED'}**")  # fmt: skip
    return out


async def run_parts(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="pa-webhook-waiters-") as tmp:
        for part in args.parts:
            for poll_after in args.poll_after if part == "B" else [None]:
                print(f"part {part} ...", file=sys.stderr, flush=True)
                results.append(await run_part(part, args, Path(tmp), poll_after))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=["A", "B", "C"], default=["A", "B", "C"])
    parser.add_argument("--n", type=int, default=1000, help="handlers = runs")
    parser.add_argument("--width", type=int, default=50, help="max_in_flight of the client")
    parser.add_argument(
        "--durations",
        nargs=2,
        type=float,
        default=(1.0, 10.0),
        metavar=("MIN", "MAX"),
        help="run durations, seconds from creation (seeded, uniform)",
    )
    parser.add_argument(
        "--poll-after",
        type=float,
        nargs="+",
        default=[5.0, 12.0],
        help="B: webhooks.poll_after, seconds; B runs once per value",
    )
    parser.add_argument("--drop", type=float, default=0.1, help="B: share of webhooks lost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child_main(args.child)
        return
    low, high = args.durations
    if args.n < 1 or args.width < 1 or not 0 <= low <= high:
        parser.error("--n and --width must be >= 1, and 0 <= MIN <= MAX for --durations")
    if not 0 <= args.drop <= 1 or not all(p > 0 for p in args.poll_after):
        parser.error("--drop must be in [0, 1] and --poll-after > 0")
    results = asyncio.run(run_parts(args))
    command = "python benchmarks/webhook_waiters.py " + " ".join(sys.argv[1:])
    lines = [
        f"parallel-async {_commit()}, {platform.platform()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        f"Command: `{command.strip()}`",
        f"{args.n} handlers on one client, max_in_flight={args.width}, each creating a run "
        f"({low:g}-{high:g} s, seeded {args.seed}) then awaiting its `result()`.",
        report(results),
        "\n".join(verdicts(results)),
    ]
    print("\n\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"argv": sys.argv[1:], "commit": _commit(), "results": results}
    (RESULTS / f"webhook-waiters-{stamp}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

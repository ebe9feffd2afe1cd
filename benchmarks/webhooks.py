"""Webhook verification throughput: ``python benchmarks/webhooks.py [--n 20000] [--repeat 5]``.

Verification sits on a web app's hot path (every delivery), so it must cost little next to the
request itself. This signs ``--n`` distinct ``task_run.status`` deliveries (the fake's body
shape, one webhook id each), then times, on one thread (one core), single-threaded loops of:

* ``verify`` with a ``whsec_`` secret and with a raw secret (Parallel's two forms);
* ``client.webhooks.unwrap`` (parsed keys kept by the client);
* ``standardwebhooks.Webhook.verify`` on the same deliveries (``whsec_`` only: it cannot take a
  raw secret), for the ratio. It returns a dict from ``json.loads``; ours a typed event.

Each figure is the best of ``--repeat`` rounds, in events per second of CPU time
(``time.process_time``). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import base64
import time
import uuid
from collections.abc import Callable

import standardwebhooks

from parallel_async.webhooks import WebhookResource, event_payload, sign, verify

WHSEC = "whsec_" + base64.b64encode(b"benchmark-webhook-secret-32bytes").decode()
RAW = "benchmark-raw-webhook-secret"
TARGET = 100_000


def _deliveries(n: int, secret: str) -> list[tuple[bytes, dict[str, str]]]:
    out = []
    for i in range(n):
        run_id = f"trun_{uuid.uuid4().hex}"
        body = event_payload(
            {
                "run_id": run_id,
                "interaction_id": run_id,
                "status": "completed" if i % 10 else "failed",
                "is_active": False,
                "processor": "base",
                "metadata": {"row": i, "source": "benchmark"},
                "taskgroup_id": None,
                "warnings": None,
                "error": None if i % 10 else {"ref_id": "r", "message": "no sources"},
                "created_at": "2026-11-30T00:00:00.000000Z",
                "modified_at": "2026-11-30T00:00:05.123456Z",
            }
        )
        out.append((body, sign(body, secret)))
    return out


def _rate(
    check: Callable[[bytes, dict[str, str]], object],
    items: list[tuple[bytes, dict[str, str]]],
    repeat: int,
) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for body, headers in items:
            check(body, headers)
        best = min(best, time.process_time() - start)
    return len(items) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="deliveries per round")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best counts")
    args = parser.parse_args()

    whsec = _deliveries(args.n, WHSEC)
    raw = _deliveries(args.n, RAW)
    resource = WebhookResource(WHSEC)
    theirs = standardwebhooks.Webhook(WHSEC)

    rows = [
        ("`verify`, whsec_ secret", _rate(lambda b, h: verify(b, h, WHSEC), whsec, args.repeat)),
        ("`verify`, raw secret", _rate(lambda b, h: verify(b, h, RAW), raw, args.repeat)),
        ("`client.webhooks.unwrap`", _rate(resource.unwrap, whsec, args.repeat)),
        ("`standardwebhooks` 1.1 `verify`", _rate(theirs.verify, whsec, args.repeat)),
    ]
    baseline = rows[-1][1]
    print(f"{args.n:,} deliveries per round, best of {args.repeat}, one thread\n")
    print("| verifier | events/s per core | vs standardwebhooks |")
    print("|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / baseline:.2f}x |")
    ours = min(rate for _, rate in rows[:3])
    verdict = "meets" if ours >= TARGET else "MISSES"
    print(f"\nslowest of ours: {ours:,.0f} events/s: {verdict} the {TARGET:,}/s target")


if __name__ == "__main__":
    main()

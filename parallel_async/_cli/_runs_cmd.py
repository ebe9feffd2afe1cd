"""One-run commands: ``run``, ``result``, ``input``, ``status`` and ``events``; JSON on stdout."""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import msgspec

from .._client import AsyncParallel
from .._errors import InvalidArgumentError, RunError
from .._protocol import validate_id
from ._common import EXIT_INCOMPLETE, EXIT_OK, HelpFormatter, add_spec_options, spec_from

__all__ = ["add_parsers"]

_ENCODER = msgspec.json.Encoder()


def _print(value: Any) -> None:
    sys.stdout.write(_ENCODER.encode(value).decode() + "\n")
    sys.stdout.flush()


def add_parsers(sub: Any) -> None:
    """Register the one-run commands."""
    fmt = HelpFormatter
    run = sub.add_parser(
        "run",
        help="create one run and print its result",
        description="Create one run, wait for it, and print its output as JSON.",
        formatter_class=fmt,
    )
    run.add_argument(
        "input", metavar="INPUT", help="what to research: text, a JSON object, or - for stdin"
    )
    run.add_argument("--processor", default="lite", help="the processor")
    add_spec_options(run, required=False)
    run.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="seconds to wait")
    run.add_argument(
        "--full", action="store_true", help="print the whole result (run, output and basis)"
    )
    run.set_defaults(handler=_run)

    for name, text in (
        ("result", "wait for a run and print its result"),
        ("input", "print a run's input"),
        ("status", "print a run's status"),
        ("events", "print a run's events as JSON lines until it ends"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                           formatter_class=fmt)  # fmt: skip
        p.add_argument("run_id", metavar="RUN_ID", help="the run, e.g. trun_9907962f83aa...")
        if name in ("result", "events"):
            p.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                           help="seconds to wait")  # fmt: skip
        p.set_defaults(handler=_one_run, what=name)


def _run(args: Any, argv: Any) -> int:
    spec = spec_from(args)
    text = sys.stdin.read() if args.input == "-" else args.input
    if not text.strip():
        raise InvalidArgumentError("the input is empty: say what to research")
    value: Any = text
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise InvalidArgumentError(f"the input looks like JSON but is not ({exc})") from None
    if args.timeout <= 0:
        raise InvalidArgumentError("--timeout must be positive")

    async def main() -> int:
        async with AsyncParallel() as client:
            try:
                result = await client.task_run.execute(
                    input=value,
                    processor=args.processor,
                    output=None if spec is None else spec.task_spec,
                    timeout=args.timeout,
                )
            except RunError as exc:
                sys.stderr.write(f"parallel-async: {exc}\n")
                return EXIT_INCOMPLETE
            _print(result if args.full else result.output.content)
            return EXIT_OK

    return anyio.run(main)


def _one_run(args: Any, argv: Any) -> int:
    run_id = validate_id(args.run_id)
    timeout = getattr(args, "timeout", None)
    if timeout is not None and timeout <= 0:
        raise InvalidArgumentError("--timeout must be positive")

    async def main() -> int:
        async with AsyncParallel() as client:
            try:
                if args.what == "result":
                    _print(await client.task_run.result(run_id, timeout=timeout))
                elif args.what == "input":
                    _print(await client.task_run.retrieve_input(run_id))
                elif args.what == "status":
                    _print(await client.task_run.retrieve(run_id))
                else:
                    async with await client.task_run.events(run_id, timeout=timeout) as events:
                        async for event in events:
                            _print(event)
            except RunError as exc:
                sys.stderr.write(f"parallel-async: {exc}\n")
                return EXIT_INCOMPLETE
        return EXIT_OK

    return anyio.run(main)

"""The ``parallel-async`` command: ``enrich`` a table, one-run commands, ``demo`` and
``fake-server``. Errors end in one line that says what to fix, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._errors import ParallelError
from .._version import __version__
from . import _demo, _enrich_cmd, _fake_cmd, _runs_cmd
from ._common import EXIT_INTERRUPTED, error, exit_code_for, message_for

__all__ = ["main"]


def parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    p = argparse.ArgumentParser(
        prog="parallel-async",
        description="Parallel's Task API from the command line: enrich a table (one run per "
        "row, resumable, never paid twice), run one task, look at runs, or try it all on the "
        "embedded fake server with `demo`. The API key comes from PARALLEL_API_KEY.",
    )
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _enrich_cmd.add_parser(sub)
    _runs_cmd.add_parsers(sub)
    _demo.add_parser(sub)
    _fake_cmd.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``parallel-async`` command; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(args_list)
    try:
        code: int = args.handler(args, args_list)
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except ParallelError as exc:
        error(message_for(exc))
        return exit_code_for(exc)
    except OSError as exc:
        error(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return 2
    return code

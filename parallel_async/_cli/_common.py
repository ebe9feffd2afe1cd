"""What every command shares: exit codes, one-line messages for errors, output specs."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

from .._errors import (
    AuthenticationError,
    FieldSpecError,
    InvalidArgumentError,
    JournalError,
    MissingAPIKeyError,
    ParallelError,
    PermissionDeniedError,
)
from .._fields import OutputSpec, output_spec

__all__ = [
    "EXIT_API",
    "EXIT_AUTH",
    "EXIT_INCOMPLETE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "HelpFormatter",
    "add_spec_options",
    "exit_code_for",
    "message_for",
    "spec_from",
]

EXIT_OK = 0  # every row completed
EXIT_INCOMPLETE = 1  # the job finished; some rows did not complete (each marked)
EXIT_USAGE = 2  # bad input or usage
EXIT_AUTH = 3  # no API key, or the key was refused
EXIT_API = 4  # the API (or the network) failed
EXIT_TIMEOUT = 5  # the job's time ran out: run the same command again to resume
EXIT_INTERRUPTED = 130  # Ctrl-C


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows a default where there is one, and keeps the epilog's lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an error that ended a command."""
    if isinstance(exc, MissingAPIKeyError | AuthenticationError):
        return EXIT_AUTH
    if isinstance(exc, InvalidArgumentError | JournalError):
        return EXIT_USAGE
    return EXIT_API


def message_for(exc: BaseException) -> str:
    """One line (a field spec error adds its caret lines) that says what to fix."""
    if isinstance(exc, MissingAPIKeyError):
        return (
            "no API key: set PARALLEL_API_KEY (get one at https://platform.parallel.ai), or try "
            "`parallel-async demo`, which needs none"
        )
    if isinstance(exc, AuthenticationError):
        return f"the API refused the key ({exc}): check PARALLEL_API_KEY"
    if isinstance(exc, PermissionDeniedError):
        return f"the API refused the request ({exc}): is the processor name right?"
    if isinstance(exc, FieldSpecError):
        return str(exc)
    if isinstance(exc, ParallelError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def add_spec_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """``--fields``, ``--field`` (repeated) and ``--schema``: the output, in one of three ways."""
    group = parser.add_argument_group("output fields (one of)")
    group.add_argument(
        "--fields",
        metavar="SPEC",
        help="fields in one line: \"ceo: the CEO's full name, founded int: year founded, "
        'public bool"; types str (default), int, float, bool, list[T]',
    )
    group.add_argument(
        "--field",
        action="append",
        metavar="ENTRY",
        help="one field (repeat the option); commas are free in its description",
    )
    group.add_argument("--schema", metavar="FILE", help="a JSON Schema file for the output")
    parser.set_defaults(_spec_required=required)


def spec_from(args: Any) -> OutputSpec | None:
    """The output spec the options give (``None`` when none was given and none is needed)."""
    given = [x for x in (args.fields, args.field, args.schema) if x]
    if len(given) > 1:
        raise InvalidArgumentError("give the output fields one way: --fields, --field or --schema")
    if not given:
        if args._spec_required:
            raise InvalidArgumentError(
                'say what to find: --fields "ceo, founded int", --field ... or --schema FILE'
            )
        return None
    if args.schema:
        return output_spec(pathlib.Path(args.schema))
    if args.field:
        return output_spec(list(args.field))
    return output_spec(str(args.fields))


def error(message: str) -> None:
    """Print ``parallel-async: error: ...`` to stderr."""
    sys.stderr.write(f"parallel-async: error: {message}\n")
    sys.stderr.flush()

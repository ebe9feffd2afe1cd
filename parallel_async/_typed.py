"""Typed results: a run's JSON output decoded into the type its schema was built from.

The schemas themselves are built in ``_schema``. `parse_output` decodes with msgspec (strict by
default) and, when the content does not fit, raises `OutputValidationError` carrying the raw
content, the failing path and the untyped result; ``basis`` per field stays reachable next to
the typed value (`ParsedTaskRunJsonOutput.basis_for`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

import msgspec

from ._errors import OutputValidationError
from ._models import FieldBasis, TaskRun, TaskRunJsonOutput, TaskRunResult
from ._schema import _hashable

__all__ = [
    "OutputValidationError",
    "ParsedTaskRunJsonOutput",
    "ParsedTaskRunResult",
    "parse_output",
]

T = TypeVar("T")

_AT = re.compile(r" - at `(\$[^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


class ParsedTaskRunJsonOutput(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    """A JSON output and its decoded value, shaped like the official SDK's (``.parsed``).

    ``raw`` is the untyped `TaskRunJsonOutput` (``mcp_tool_calls``, ``output_schema``...).
    """

    parsed: T
    """The content decoded into your type."""
    raw: TaskRunJsonOutput
    """The untyped output."""

    @property
    def type(self) -> Literal["json"]:
        """Always ``"json"``."""
        return "json"

    @property
    def content(self) -> dict[str, Any]:
        """The raw JSON content."""
        return self.raw.content

    @property
    def basis(self) -> list[FieldBasis]:
        """Reasoning, citations and confidence per top-level field."""
        return self.raw.basis

    def basis_for(self, field: str) -> FieldBasis | None:
        """The basis of a top-level field (or ``field.N`` list element), if any."""
        return self.raw.basis_for(field)


class ParsedTaskRunResult(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    """A completed run with its output decoded: ``result.output.parsed`` is a ``T``."""

    output: ParsedTaskRunJsonOutput[T]
    """The output, with ``parsed`` holding the typed value."""
    result: TaskRunResult
    """The untyped result, as the API sent it."""

    @property
    def run(self) -> TaskRun:
        """The run's status object."""
        return self.result.run


# --- decoding -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _converter(tp: Any, strict: bool) -> Callable[[Any], Any]:
    # msgspec caches a class's decoding plan on the class itself; this keeps the rest per type.
    return functools.partial(msgspec.convert, type=tp, strict=strict)


def parse_output(
    result: TaskRunResult, output_type: type[T], *, strict: bool = True
) -> ParsedTaskRunResult[T]:
    """Decode a run's JSON output into ``output_type`` (the type its schema came from).

    ``strict=False`` lets msgspec coerce, e.g. ``"3"`` or ``3.0`` into an ``int`` field.

    Raises:
        OutputValidationError: the content does not fit ``output_type``, the output is text,
            or decoding it failed in any other way (content nested too deeply, say).
    """
    output = result.output
    name = getattr(output_type, "__name__", repr(output_type))
    if not isinstance(output, TaskRunJsonOutput):
        raise OutputValidationError(
            f"the output is text, but {name} needs a JSON object; create the run with "
            f"output={name} (a JSON schema), not a text schema",
            result=result,
            path="$",
            output_type=output_type,
        )
    tp: Any = output_type
    convert = _converter(tp, strict) if _hashable(tp) else _converter.__wrapped__(tp, strict)
    try:
        parsed: T = convert(output.content)
    except msgspec.ValidationError as exc:
        message = str(exc)
        at = _AT.search(message)
        path = at[1] if at else "$"
        if missing := _MISSING.search(message):
            path = f"{path}.{missing[1]}"
        raise OutputValidationError(
            f"the output does not fit {name}: {message}",
            result=result,
            path=path,
            output_type=output_type,
        ) from exc
    except Exception as exc:  # e.g. RecursionError on content nested too deeply
        raise OutputValidationError(
            f"the output could not be decoded into {name}: {type(exc).__name__}: {exc}",
            result=result,
            path="$",
            output_type=output_type,
        ) from exc
    return ParsedTaskRunResult(
        output=ParsedTaskRunJsonOutput(parsed=parsed, raw=output), result=result
    )

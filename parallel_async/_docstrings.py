"""Descriptions from Google-style docstrings: a class's summary and its ``Attributes:`` entries.

Pure text parsing for the schemas built from types (``_schema``); source code is never read.
"""

from __future__ import annotations

import inspect
import re

__all__ = ["attribute_docs", "summary"]

_SECTION = re.compile(
    r"(Attributes|Fields|Args|Arguments|Parameters|Examples?|Notes?|Raises|Returns|Yields|"
    r"See Also|References|Methods)\s*:?"
)
_ENTRY = re.compile(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")


def summary(doc: str) -> str:
    """A docstring's text before its first section header (``Attributes:``, ``Args:``...)."""
    lines = inspect.cleandoc(doc).splitlines()
    end = next((i for i, line in enumerate(lines) if _SECTION.fullmatch(line.strip())), None)
    return "\n".join(lines[:end]).strip()


def attribute_docs(doc: str) -> dict[str, str]:
    """Field descriptions from a Google-style ``Attributes:``/``Fields:`` docstring section."""
    out: dict[str, str] = {}
    header: int | None = None  # indent of the section header, while inside the section
    entry_indent: int | None = None
    entry = ""
    for line in inspect.cleandoc(doc).splitlines():
        text, indent = line.strip(), len(line) - len(line.lstrip())
        if header is None:
            if text in ("Attributes:", "Fields:"):
                header, entry_indent = indent, None
            continue
        if not text:
            continue
        if indent <= header:  # the section ended
            header = None
            continue
        entry_indent = indent if entry_indent is None else entry_indent
        match = _ENTRY.fullmatch(text) if indent == entry_indent else None
        if match:
            entry = match[1]
            out[entry] = match[2].strip()
        elif entry:
            out[entry] = f"{out[entry]} {text}".strip()
    return out

"""The ```python blocks of README.md and docs/**/*.md, for the tests that run them.

A block preceded by the line ``<!-- docs-test: skip, covered by tests/test_NAME.py -->`` (blank
lines allowed in between) is not a standalone program; the named test file runs it instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\s`{]*)")
_MARKER = re.compile(
    r"^<!--\s*docs-test:\s*skip,\s*covered by\s+(?P<test>tests/test_\w+\.py)\s*-->$"
)
_PYTHON = frozenset({"python", "py"})


@dataclass(frozen=True)
class Block:
    """One ```python block: where it is, its code, and the test covering it if it is skipped."""

    path: str  # relative to the repository root, with forward slashes
    line: int  # 1-based line of the opening fence
    code: str
    covered_by: str | None  # "tests/test_NAME.py" when marked as skipped

    @property
    def id(self) -> str:
        """``file:line``, the test id."""
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Marker:
    """A ``docs-test:`` comment line, and whether a python block follows it."""

    path: str
    line: int
    text: str
    used: bool

    @property
    def covered_by(self) -> str | None:
        """The test file it names, or ``None`` when the line is malformed."""
        match = _MARKER.match(self.text)
        return match["test"] if match else None


def doc_files() -> list[Path]:
    """README.md, then every Markdown file under docs/, in a stable order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _scan(path: Path) -> tuple[list[Block], list[Marker]]:
    rel = path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    markers: list[Marker] = []
    waiting: tuple[int, str] | None = None  # a marker line not yet followed by anything

    def settle(used: bool) -> Marker | None:
        nonlocal waiting
        if waiting is None:
            return None
        marker = Marker(rel, waiting[0], waiting[1], used)
        markers.append(marker)
        waiting = None
        return marker

    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        fence = _FENCE.match(lines[i])
        if fence is None:
            if "docs-test:" in stripped:
                settle(used=False)
                waiting = (i + 1, stripped)
            elif stripped:
                settle(used=False)
            i += 1
            continue
        indent, chars, lang = fence["indent"], fence["fence"], fence["lang"].lower()
        end = i + 1  # the closing fence: the same character, at least as many
        while end < len(lines):
            closing = lines[end].strip()
            if closing.startswith(chars) and not closing.strip(chars[0]):
                break
            end += 1
        if lang in _PYTHON:
            marker = settle(used=True)
            body = "".join(line.removeprefix(indent) + "\n" for line in lines[i + 1 : end])
            blocks.append(Block(rel, i + 1, body, marker.covered_by if marker else None))
        else:
            settle(used=False)
        i = end + 1
    settle(used=False)
    return blocks, markers


def python_blocks() -> list[Block]:
    """Every ```python block of the docs, in file and line order."""
    return [block for path in doc_files() for block in _scan(path)[0]]


def markers() -> list[Marker]:
    """Every ``docs-test:`` comment line of the docs."""
    return [marker for path in doc_files() for marker in _scan(path)[1]]

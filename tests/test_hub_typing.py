"""Typed front doors: ``result(output=T)`` and ``execute(output=T)`` to a type checker.

Runs mypy (its API, in-process) on a small typed example and checks the revealed types.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parent.parent

EXAMPLE = """
from dataclasses import dataclass
from typing import TypedDict

import msgspec

from parallel_async import AsyncParallel, JsonSchema


class Company(msgspec.Struct):
    name: str
    founded: int


@dataclass
class Person:
    name: str


class Place(TypedDict):
    city: str


async def main(client: AsyncParallel) -> None:
    typed = await client.task_run.result("trun_1", output=Company)
    reveal_type(typed)
    reveal_type(typed.output.parsed)
    year: int = typed.output.parsed.founded
    plain = await client.task_run.result("trun_1", api_timeout=30, timeout=None)
    reveal_type(plain)
    described = await client.task_run.result("trun_1", output="a one-line memo")
    reveal_type(described)
    schema = JsonSchema(json_schema={"type": "object"})
    reveal_type(await client.task_run.result("trun_1", output=schema))
    executed = await client.task_run.execute(input="Acme", processor="base", output=Company)
    reveal_type(executed.output.parsed)
    reveal_type(await client.task_run.execute(input="Acme", processor="base", output=Person))
    reveal_type(await client.task_run.execute(input="Acme", processor="base"))
    reveal_type(await client.task_run.result("trun_1", output=Place))
    print(year, plain.output.content)
"""

EXPECTED = [
    "parallel_async._typed.ParsedTaskRunResult[example.Company]",
    "example.Company",
    "parallel_async._models.TaskRunResult",
    "parallel_async._models.TaskRunResult",
    "parallel_async._models.TaskRunResult",
    "example.Company",
    "parallel_async._typed.ParsedTaskRunResult[example.Person]",
    "parallel_async._models.TaskRunResult",
    # a TypedDict is spelt differently across mypy versions: only its name is checked
    "parallel_async._typed.ParsedTaskRunResult[TypedDict(*example.Place*",
]


def test_typed_results_under_mypy_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = tmp_path / "example.py"
    example.write_text(textwrap.dedent(EXAMPLE))
    monkeypatch.setenv("MYPYPATH", str(ROOT))  # this tree's parallel_async, not an installed one
    monkeypatch.chdir(tmp_path)
    stdout, stderr, _status = api.run(
        [
            "--strict",
            "--follow-imports=silent",
            "--no-error-summary",
            "--show-absolute-path",
            f"--cache-dir={ROOT / '.mypy_cache'}",
            str(example),
        ]
    )
    lines = stdout.splitlines()
    errors = [line for line in lines if ": error:" in line]
    assert errors == [], stdout + stderr
    revealed = [line.split('Revealed type is "', 1)[1] for line in lines if "Revealed" in line]
    assert len(revealed) == len(EXPECTED), stdout
    for got, want in zip(revealed, EXPECTED, strict=True):
        pattern = ".*".join(re.escape(part) for part in want.split("*"))  # * is a wildcard
        assert re.fullmatch(pattern, got.rstrip('"')), (got, want)

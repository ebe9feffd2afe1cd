"""Output specs in four forms compile to one schema; row keys are stable and question-bound."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import msgspec
import pytest

from parallel_async import (
    FieldSpecError,
    InvalidArgumentError,
    OutputField,
    OutputSpec,
    job_fingerprint,
    output_spec,
    row_key,
)

LINE = "ceo: the CEO's full name, founded int: year founded, public bool"


class Company(msgspec.Struct):
    """A company.

    Attributes:
        ceo: the CEO's full name
        founded: year founded
    """

    ceo: str
    founded: int
    public: bool


def test_one_line_syntax_compiles_to_a_strict_object_schema() -> None:
    spec = output_spec(LINE)
    assert spec.schema == {
        "type": "object",
        "properties": {
            "ceo": {"type": "string", "description": "the CEO's full name"},
            "founded": {"type": "integer", "description": "year founded"},
            "public": {"type": "boolean"},
        },
        "required": ["ceo", "founded", "public"],
        "additionalProperties": False,
    }
    assert spec.fields == (
        OutputField("ceo", "str", "the CEO's full name"),
        OutputField("founded", "int", "year founded"),
        OutputField("public", "bool", ""),
    )
    assert spec.names == ("ceo", "founded", "public")


def test_four_forms_give_the_same_columns(tmp_path: pathlib.Path) -> None:
    line = output_spec(LINE)
    entries = output_spec(["ceo: the CEO's full name", "founded int: year founded", "public bool"])
    as_dict = output_spec(line.schema)
    wrapped = output_spec({"type": "json", "json_schema": line.schema})
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(line.schema))
    from_file = output_spec(path)
    typed = output_spec(Company)
    for spec in (entries, as_dict, wrapped, from_file):
        assert spec.schema == line.schema
    assert typed.fields == line.fields
    assert typed.output_type is Company
    assert output_spec(line) is line


def test_lists_newlines_and_commas_inside_entries() -> None:
    spec = output_spec("tags list[str]: topics\nscores list[ float ]\nsummary: short, plain")
    assert [f.type for f in spec.fields] == ["list[str]", "list[float]", "str"]
    assert spec.fields[2].description == "short, plain"
    assert spec.schema["properties"]["scores"] == {"type": "array", "items": {"type": "number"}}
    assert output_spec("a, b,").names == ("a", "b")  # a trailing comma is nothing


@pytest.mark.parametrize(
    ("text", "position", "entry", "needle"),
    [
        ("ceo, founded integer: year", 13, 2, "unknown type 'integer'"),
        ("ceo, ceo", 5, 2, "given twice"),
        ("ceo, 9lives", 5, 2, "not a field name"),
        ("ceo, : desc", 5, 2, "needs a name"),
        ("a\nb strr: y", 4, 2, "unknown type 'strr'"),
        ("ceo, _status", 5, 2, "status column"),
        ("x list[date]", 2, 1, "list[date]"),
    ],
)
def test_bad_specs_say_where(text: str, position: int, entry: int, needle: str) -> None:
    with pytest.raises(FieldSpecError) as info:
        output_spec(text)
    err = info.value
    assert (err.position, err.entry) == (position, entry)
    assert needle in str(err)
    caret_line = str(err).splitlines()[-1]
    line_text = str(err).splitlines()[-2]
    assert caret_line.index("^") - 2 == position - (text.rfind("\n", 0, position) + 1)
    assert line_text.strip() in text


@pytest.mark.parametrize("text", ["", "  ", ",", "\n\n"])
def test_empty_specs_are_refused(text: str) -> None:
    with pytest.raises(FieldSpecError, match="field"):
        output_spec(text)


def test_bad_schemas_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidArgumentError, match="object with properties"):
        output_spec({"type": "string"})
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        output_spec(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        output_spec(bad)
    with pytest.raises(InvalidArgumentError, match="status column"):
        output_spec({"type": "object", "properties": {"_error": {"type": "string"}}})
    with pytest.raises(InvalidArgumentError, match="over the"):
        output_spec([f"f{i}: {'x' * 200}" for i in range(100)])
    with pytest.raises(InvalidArgumentError):
        output_spec(42)


def test_column_types_of_json_schemas() -> None:
    spec = output_spec(
        {
            "type": "object",
            "properties": {
                "a": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "b": {"type": ["number", "null"]},
                "c": {"type": "object", "properties": {}},
                "d": {"type": "array", "items": {"type": "object"}},
                "e": {"type": "array", "items": {"type": "boolean"}},
                "f": {"enum": ["x", "y"]},
            },
        }
    )
    assert [f.type for f in spec.fields] == ["int", "float", "json", "json", "list[bool]", "json"]


@pytest.mark.parametrize(
    ("kind", "value", "expected", "ok"),
    [
        ("int", 1990, 1990, True),
        ("int", 1990.0, 1990, True),
        ("int", 1990.5, None, False),
        ("int", True, None, False),
        ("int", "1990", None, False),
        ("float", 3, 3.0, True),
        ("bool", False, False, True),
        ("str", 5, None, False),
        ("list[int]", [1, 2.0], [1, 2], True),
        ("list[int]", [1, "x"], None, False),
        ("list[str]", "x", None, False),
        ("json", {"a": 1}, {"a": 1}, True),
        ("str", None, None, True),
    ],
)
def test_values_are_typed_losslessly(kind: str, value: Any, expected: Any, ok: bool) -> None:
    got, problem = OutputField("f", kind).coerce(value)
    assert got == expected
    assert type(got) is type(expected)
    assert (problem is None) is ok


def test_values_fill_every_field() -> None:
    spec = output_spec(LINE)
    row, problems = spec.values({"ceo": "Ada", "founded": "long ago"})
    assert row == {"ceo": "Ada", "founded": None, "public": None}
    assert problems == ["field 'founded': expected int, got 'long ago'"]
    assert spec.values(None) == ({"ceo": None, "founded": None, "public": None}, [])


def test_task_spec_carries_the_schema() -> None:
    spec = output_spec(LINE)
    encoded = msgspec.json.decode(msgspec.json.encode(spec.task_spec))
    assert encoded == {"output_schema": {"type": "json", "json_schema": spec.schema}}


def test_row_keys() -> None:
    spec = output_spec(LINE)
    fp = job_fingerprint(spec, "base")
    assert len(fp) == 16
    a = row_key({"name": "Acme", "city": "Oslo"}, fingerprint=fp)
    assert len(a) == 32
    assert a == row_key({"city": "Oslo", "name": "Acme"}, fingerprint=fp)  # order-free
    assert a != row_key({"name": "Acme", "city": "Bergen"}, fingerprint=fp)
    only_name = row_key({"name": "Acme", "city": "Oslo"}, fingerprint=fp, columns=["name"])
    assert only_name == row_key(
        {"name": "Acme", "city": "Bergen"}, fingerprint=fp, columns=["name"]
    )
    by_id = row_key({"id": 7, "name": "x"}, fingerprint=fp, key="id")
    assert by_id == row_key({"id": 7, "name": "y"}, fingerprint=fp, key="id")
    assert by_id != row_key({"id": "7", "name": "x"}, fingerprint=fp, key="id")
    # a changed question changes every key
    for other in (
        job_fingerprint(spec, "core"),
        job_fingerprint(output_spec(LINE + ", hq"), "base"),
        job_fingerprint(spec, "base", columns=["name"]),
    ):
        assert other != fp
        assert row_key({"name": "Acme", "city": "Oslo"}, fingerprint=other) != a
    # stable across processes and versions of this code: pinned
    assert job_fingerprint(output_spec("a"), "lite") == job_fingerprint(output_spec(["a"]), "lite")


def test_row_key_errors() -> None:
    fp = job_fingerprint(output_spec("a"), "lite")
    with pytest.raises(InvalidArgumentError, match="key column 'id'"):
        row_key({"name": "x"}, fingerprint=fp, key="id")
    with pytest.raises(InvalidArgumentError, match="key column"):
        row_key({"id": ""}, fingerprint=fp, key="id")
    with pytest.raises(InvalidArgumentError, match="JSON"):
        row_key({"a": object()}, fingerprint=fp)
    with pytest.raises(InvalidArgumentError, match="processor"):
        job_fingerprint(output_spec("a"), "")


def test_output_spec_is_frozen() -> None:
    spec = output_spec("a")
    assert isinstance(spec, OutputSpec)
    with pytest.raises(AttributeError):
        spec.fields = ()  # type: ignore[misc]

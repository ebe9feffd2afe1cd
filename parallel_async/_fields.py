"""Output specs and row identity for enrichment: pure functions, no I/O but reading a file.

An enrichment asks every row the same question; the answer's shape is an `OutputSpec`,
compiled by `output_spec` from any of four forms into ONE JSON schema:

* a msgspec Struct (or dataclass, TypedDict) type: the schema of ``_schema.json_schema_for``;
* a JSON Schema: a dict (bare, or ``{"type": "json", "json_schema": ...}``) or a
  ``pathlib.Path`` to a ``.json`` file holding one;
* the one-line field syntax of ``llm``: ``"ceo: the CEO's full name, founded int: year
  founded, public bool"``: entries split on commas (on newlines instead when there is one),
  each ``NAME [TYPE][: DESCRIPTION]``, types ``str`` (default), ``int``, ``float``, ``bool``
  and ``list[T]`` of those;
* a list of such entries, one field each (the CLI's repeated ``--field``); commas are then
  free inside descriptions.

Each top-level property becomes an `OutputField` with a column type (``str``, ``int``,
``float``, ``bool``, ``list[...]`` or ``json`` for anything nested), so columns stay typed in
Parquet and DataFrames.

Row identity: `row_key` names a row by its key column's value, or by a hash of the chosen
columns' content, salted with `job_fingerprint` (the schema, processor and input columns): a
changed question gives every row a new key, so two questions' answers never mix. A run
carries its row key in ``metadata[ROW_KEY_METADATA]``: that is how a run is found again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from ._errors import FieldSpecError, InvalidArgumentError
from ._models import JsonSchema, TaskSpec
from ._schema import MAX_TASK_SPEC_CHARS, json_schema_for

__all__ = [
    "ATTEMPT_METADATA",
    "RESERVED_COLUMNS",
    "ROW_KEY_METADATA",
    "SCALAR_TYPES",
    "OutputField",
    "OutputSpec",
    "job_fingerprint",
    "output_spec",
    "row_key",
]

ROW_KEY_METADATA = "pa_row"
"""The run ``metadata`` key holding its row key (at most 16 characters, as the API requires)."""
ATTEMPT_METADATA = "pa_try"
"""The run ``metadata`` key holding which create of its row the run is: 1, then one more for
each retry of a failed row. A row key and an attempt name at most one run."""
RESERVED_COLUMNS = ("_status", "_error", "_run_id")
"""The columns every enriched row ends with; no output field may take these names."""
SCALAR_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
"""Field-syntax type names and the JSON Schema types they compile to."""

_JSON_TO_SCALAR = {v: k for k, v in SCALAR_TYPES.items()}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LIST = re.compile(r"list\[\s*(\w+)\s*\]\Z")
_FINGERPRINT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class OutputField:
    """One output column.

    Attributes:
        name: the property name (and column name).
        type: ``"str"``, ``"int"``, ``"float"``, ``"bool"``, ``"list[T]"`` of those, or
            ``"json"`` (an object or anything else kept as JSON).
        description: what the run is asked for (may be empty).
    """

    name: str
    type: str
    description: str = ""

    @property
    def item_type(self) -> str | None:
        """``T`` of a ``list[T]`` field, else ``None``."""
        match = _LIST.match(self.type)
        return match.group(1) if match else None

    def coerce(self, value: Any) -> tuple[Any, str | None]:
        """``value`` as this column's type, and a problem when it does not fit (then None).

        Lossless conversions only: an integral float becomes an int, an int a float.
        """
        if value is None or self.type == "json":
            return value, None
        item = self.item_type
        if item is not None:
            if not isinstance(value, list):
                return None, f"field {self.name!r}: expected a list, got {_show(value)}"
            out = []
            for v in value:
                fitted = _fit(item, v)
                if fitted is _MISFIT:
                    return None, f"field {self.name!r}: expected list[{item}], got {_show(v)}"
                out.append(fitted)
            return out, None
        fitted = _fit(self.type, value)
        if fitted is _MISFIT:
            return None, f"field {self.name!r}: expected {self.type}, got {_show(value)}"
        return fitted, None


_MISFIT = object()


def _fit(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "str":
        return value if isinstance(value, str) else _MISFIT
    if kind == "bool":
        return value if isinstance(value, bool) else _MISFIT
    if isinstance(value, bool):
        return _MISFIT
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        return _MISFIT
    if kind == "float":
        return float(value) if isinstance(value, int | float) else _MISFIT
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclasses.dataclass(frozen=True, eq=False)
class OutputSpec:
    """The compiled answer shape of an enrichment: one JSON schema and its typed columns.

    Build it with `output_spec`. Immutable and hashable by identity; ``schema`` is shared,
    don't mutate it.

    Attributes:
        schema: the JSON schema of one row's output (an object).
        fields: the top-level properties as typed columns, in schema order.
        output_type: the Struct/dataclass/TypedDict type it came from, else ``None``.
    """

    schema: dict[str, Any]
    fields: tuple[OutputField, ...]
    output_type: Any = None

    @property
    def names(self) -> tuple[str, ...]:
        """The output column names, in order."""
        return tuple(f.name for f in self.fields)

    @property
    def task_spec(self) -> TaskSpec:
        """The ``task_spec`` every run of the enrichment is created with."""
        return TaskSpec(output_schema=JsonSchema(json_schema=self.schema))

    def values(self, content: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
        """A run's output ``content`` as typed column values, plus what did not fit.

        Every field gets a value (``None`` when missing or not of its type).
        """
        row: dict[str, Any] = {}
        problems: list[str] = []
        content = content or {}
        for f in self.fields:
            value, problem = f.coerce(content.get(f.name))
            row[f.name] = value
            if problem is not None:
                problems.append(problem)
        return row, problems


def output_spec(output: Any) -> OutputSpec:
    """Compile an output in any of its four forms (see the module docs) to an `OutputSpec`.

    Args:
        output: a Struct/dataclass/TypedDict type; a JSON Schema dict; a ``pathlib.Path``
            to a JSON Schema file; the one-line field syntax (a ``str``); a list of field
            entries (one field each); or an `OutputSpec` (returned as is).

    Raises:
        FieldSpecError: a bad field syntax, with its position.
        InvalidArgumentError: an unreadable schema file, or a schema that is not an object
            with properties (``SchemaError`` for a type with no schema).
    """
    if isinstance(output, OutputSpec):
        return output
    if isinstance(output, str):
        return _from_schema(_compile_text(output))
    if isinstance(output, pathlib.Path):
        return _from_schema(_read_schema_file(output))
    if isinstance(output, Mapping):
        return _from_schema(_unwrap(output))
    if isinstance(output, Sequence):
        entries = list(output)
        if not all(isinstance(e, str) for e in entries):
            raise InvalidArgumentError("a list of output fields must hold strings like 'ceo'")
        return _from_schema(_compile_entries(entries))
    if isinstance(output, JsonSchema):
        return _from_schema(output.json_schema)
    if isinstance(output, type):
        return _from_schema(json_schema_for(output).json_schema, output_type=output)
    raise InvalidArgumentError(
        "output must be a Struct/dataclass/TypedDict type, a JSON Schema (dict or "
        f"pathlib.Path), a field spec string or a list of field entries, not {output!r}"
    )


def _read_schema_file(path: pathlib.Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read the schema file {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgumentError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{path}: a JSON Schema must be a JSON object")
    return _unwrap(data)


def _unwrap(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A bare JSON schema from the API's ``{"type": "json", "json_schema": ...}`` or as is."""
    if schema.get("type") == "json" and isinstance(schema.get("json_schema"), Mapping):
        return dict(schema["json_schema"])
    return dict(schema)


def _from_schema(schema: dict[str, Any], output_type: Any = None) -> OutputSpec:
    properties = schema.get("properties")
    if schema.get("type") != "object" or not isinstance(properties, Mapping) or not properties:
        raise InvalidArgumentError(
            'an output schema must be an object with properties, like {"type": "object", '
            '"properties": {"ceo": {"type": "string"}}}'
        )
    fields = []
    for name, node in properties.items():
        if name in RESERVED_COLUMNS:
            raise InvalidArgumentError(
                f"output field {name!r} clashes with the status column of the same name; "
                "rename the field"
            )
        description = node.get("description", "") if isinstance(node, Mapping) else ""
        fields.append(OutputField(name, _column_type(node), str(description or "")))
    size = len(msgspec.json.encode(TaskSpec(output_schema=JsonSchema(json_schema=schema))))
    if size > MAX_TASK_SPEC_CHARS:
        raise InvalidArgumentError(
            f"the output schema is {size:,} characters of JSON, over the "
            f"{MAX_TASK_SPEC_CHARS:,} the API allows: use fewer fields or shorter descriptions"
        )
    return OutputSpec(schema=schema, fields=tuple(fields), output_type=output_type)


def _column_type(node: Any) -> str:
    """A property's column type: a scalar, a list of one, or ``json`` for anything else."""
    if not isinstance(node, Mapping):
        return "json"
    branches = node.get("anyOf")
    if isinstance(branches, list):  # Optional[T]: T
        real = [b for b in branches if not (isinstance(b, Mapping) and b.get("type") == "null")]
        return _column_type(real[0]) if len(real) == 1 else "json"
    kind = node.get("type")
    if isinstance(kind, list):  # ["string", "null"]
        real_kinds = [k for k in kind if k != "null"]
        kind = real_kinds[0] if len(real_kinds) == 1 else None
    if kind in _JSON_TO_SCALAR:
        return _JSON_TO_SCALAR[kind]
    if kind == "array":
        item = _column_type(node.get("items"))
        return f"list[{item}]" if item in SCALAR_TYPES else "json"
    return "json"


# --- the field syntax ---------------------------------------------------------------------------


def _compile_text(text: str) -> dict[str, Any]:
    if not text.strip():
        raise FieldSpecError("the field spec is empty; write fields like 'ceo, founded int'")
    sep = "\n" if "\n" in text else ","
    entries: list[tuple[str, int]] = []
    start = 0
    for part in text.split(sep):
        entries.append((part, start))
        start += len(part) + 1
    return _compile(entries, text)


def _compile_entries(entries: list[str]) -> dict[str, Any]:
    if not entries:
        raise FieldSpecError("no output fields given; give at least one, like 'ceo'")
    return _compile([(e, 0) for e in entries], None)


def _compile(entries: list[tuple[str, int]], text: str | None) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for number, (entry, offset) in enumerate(entries, 1):
        if not entry.strip():
            continue  # "a, b," and blank lines: nothing there
        where = (text, offset) if text is not None else (entry, 0)
        name, node = _parse_entry(entry, number, where)
        if name in properties:
            _fail(f"field {name!r} is given twice", where, entry.index(name), number)
        properties[name] = node
    if not properties:
        raise FieldSpecError("the field spec names no fields; write fields like 'ceo, founded int'")
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _parse_entry(entry: str, number: int, where: tuple[str, int]) -> tuple[str, dict[str, Any]]:
    head, colon, description = entry.partition(":")
    words = [(m.group(), m.start()) for m in re.finditer(r"\S+", head)]
    if not words:
        _fail("a field needs a name before ':'", where, len(head) - len(head.lstrip()), number)
    name, at = words[0]
    if not _NAME.match(name):
        _fail(
            f"{name!r} is not a field name (letters, digits and '_', not starting with a digit)",
            where,
            at,
            number,
        )
    if name in RESERVED_COLUMNS:
        _fail(f"{name!r} is a status column; choose another field name", where, at, number)
    type_text = " ".join(w for w, _ in words[1:])
    node = _type_node(type_text)
    if node is None:
        _fail(
            f"unknown type {type_text!r}; use str, int, float, bool or list[T] of those",
            where,
            words[1][1],
            number,
        )
    assert node is not None  # noqa: S101 - _fail raised
    description = description.strip() if colon else ""
    if description:
        node["description"] = description
    return name, node


def _type_node(text: str) -> dict[str, Any] | None:
    compact = re.sub(r"\s+", "", text)
    if not compact:
        return {"type": "string"}
    if compact in SCALAR_TYPES:
        return {"type": SCALAR_TYPES[compact]}
    match = _LIST.match(compact)
    if match and match.group(1) in SCALAR_TYPES:
        return {"type": "array", "items": {"type": SCALAR_TYPES[match.group(1)]}}
    return None


def _fail(message: str, where: tuple[str, int], column: int, number: int) -> None:
    text, offset = where
    raise FieldSpecError(message, spec=text, position=offset + column, entry=number)


# --- row identity -------------------------------------------------------------------------------


def job_fingerprint(spec: OutputSpec, processor: str, columns: Sequence[str] | None = None) -> str:
    """A short hash of the question every row is asked: schema, processor, input columns.

    Changing any of them changes every `row_key`, so a journal never hands out an answer
    to another question.
    """
    if not isinstance(processor, str) or not processor:
        raise InvalidArgumentError(f"processor must be a name like 'base', got {processor!r}")
    body = {
        "v": _FINGERPRINT_VERSION,
        "schema": spec.schema,
        "processor": processor,
        "columns": None if columns is None else list(columns),
    }
    return hashlib.sha256(_canonical(body)).hexdigest()[:16]


def row_key(
    row: Mapping[str, Any],
    *,
    fingerprint: str,
    key: str | None = None,
    columns: Sequence[str] | None = None,
) -> str:
    """The identity of a row within a job: 32 hex characters.

    Args:
        row: the input record.
        fingerprint: `job_fingerprint` of the job.
        key: a column whose value names the row (e.g. an id); it must be set on every row.
        columns: without ``key``, the columns whose content names the row (default: all of
            the row's columns, by name). Rows with equal content share a key (and a run).

    Raises:
        InvalidArgumentError: ``key`` is missing or empty in this row, or a value cannot be
            encoded as JSON.
    """
    if key is not None:
        value = row.get(key)
        if value is None or value == "":
            raise InvalidArgumentError(f"the row has no value in its key column {key!r}")
        identity: Any = ["key", value]
    else:
        names = sorted(row) if columns is None else list(columns)
        identity = ["row", [[name, row.get(name)] for name in names]]
    digest = hashlib.sha256(fingerprint.encode() + b"\0" + _canonical(identity))
    return digest.hexdigest()[:32]


def _canonical(value: Any) -> bytes:
    try:
        return msgspec.json.encode(value, order="sorted")
    except (TypeError, msgspec.EncodeError) as exc:
        raise InvalidArgumentError(f"a row value cannot be encoded as JSON: {exc}") from None

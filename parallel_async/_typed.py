"""Typed outputs and inputs: JSON schemas built from Python types, results decoded into them.

Any type ``msgspec.json.schema`` supports with an object at the root works: a ``msgspec.Struct``,
a dataclass, a ``TypedDict``. Schemas are built once per type, every ``$ref`` inlined (the API
needs a self-contained schema). Output schemas follow the API's rules (task-api.md §5.2):

* every object gets ``required`` = all its properties and ``additionalProperties: false`` (a
  field with a default is required too); ``Optional[T]`` -> ``anyOf: [T, {"type": "null"}]``;
  ``Literal``/``Enum`` -> ``enum``; defaults, titles and ``discriminator`` are dropped;
* **stripped**: validation-only keywords (``_HINTED``: ``Meta(ge=..., max_length=...)``, a
  ``datetime``'s ``format``...). The model is told them in the field's description, as
  ``[maximum: 150]``, and decoding still enforces them;
* **refused** with a `SchemaError` naming the field (``Company.address.zip``): a root that
  is not one object type, recursive types, ``dict`` and empty objects, tuples, ``typing.Any``, a
  bare ``None``, other keywords (``Meta(extra_json_schema=...)``), more than ``MAX_DEPTH``
  nested objects (the root is 1, arrays add none), ``MAX_PROPERTIES`` properties or
  ``MAX_ENUM_VALUES`` enum values in all.

Input schemas are less strict (the API reads them only as a description of the input): refs are
inlined, recursion and non-object roots refused, the rest kept as msgspec made it.

Descriptions: ``msgspec.Meta(description=...)`` wins, else the Google-style ``Attributes:`` (or
``Fields:``) section of the class docstrings along the MRO (``name: text`` or
``name (type): text``, indented continuation lines joined). A class is described by its
docstring's text before its first section. Source code is never read.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Generic, Literal, TypeVar

import msgspec
import msgspec.inspect as mi

from ._errors import InvalidArgumentError, ParallelError
from ._models import (
    AutoSchema,
    FieldBasis,
    JsonSchema,
    OutputSchema,
    TaskRun,
    TaskRunJsonOutput,
    TaskRunResult,
    TaskSpec,
    TextSchema,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_ENUM_VALUES",
    "MAX_PROPERTIES",
    "OutputValidationError",
    "ParsedTaskRunJsonOutput",
    "ParsedTaskRunResult",
    "SchemaError",
    "input_schema_for",
    "json_schema_for",
    "output_schema_for",
    "output_task_spec",
    "output_type_of",
    "parse_output",
]

T = TypeVar("T")

MAX_DEPTH = 5
MAX_PROPERTIES = 100
MAX_ENUM_VALUES = 500

# Validation-only keywords the API rejects: dropped from output schemas, restated as a hint.
_HINTED = frozenset(
    {
        "format", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "multipleOf", "minLength", "maxLength", "minItems", "maxItems", "uniqueItems",
        "minProperties", "maxProperties", "propertyNames", "contentEncoding",
        "contentMediaType", "examples",
    }
)  # fmt: skip
# Annotations that mean nothing to the model (defaults are moot: every field is required).
_DROPPED = frozenset({"default", "title", "discriminator", "$comment", "deprecated"})
_KEPT = frozenset({"type", "description", "enum", "const", "required"})
_SECTION = re.compile(
    r"(Attributes|Fields|Args|Arguments|Parameters|Examples?|Notes?|Raises|Returns|Yields|"
    r"See Also|References|Methods)\s*:?"
)
_ENTRY = re.compile(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")
_AT = re.compile(r" - at `(\$[^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_SCHEMA_TYPES = (str, Mapping, JsonSchema, TextSchema, AutoSchema, TaskSpec)


class SchemaError(InvalidArgumentError):
    """A type cannot become a schema the API accepts.

    Attributes:
        path: the offending field, e.g. ``Company.address.zip``.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class OutputValidationError(ParallelError):
    """A run's output does not decode into the requested type; nothing is lost.

    Attributes:
        content: the raw output content (a dict, or the text of a text output).
        path: where decoding failed, msgspec-style (``$.address.zip``); ``$`` is the root.
        field: the same path without ``$.`` (``address.zip``), empty for the root.
        result: the untyped `TaskRunResult`, still usable.
        run_id: the run.
        output_type: the type that was asked for.
    """

    def __init__(self, message: str, *, result: TaskRunResult, path: str, output_type: Any) -> None:
        super().__init__(f"run {result.run.run_id}: {message}")
        self.result = result
        self.content: Any = result.output.content
        self.path = path
        self.field = path[2:] if path.startswith("$.") else ""
        self.run_id = result.run.run_id
        self.output_type = output_type


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


# --- schemas ------------------------------------------------------------------------------------


def json_schema_for(tp: Any, *, what: Literal["output", "input"] = "output") -> JsonSchema:
    """The JSON schema of ``tp`` (a Struct, dataclass or TypedDict), built once per type.

    The returned object is shared between calls: don't mutate it.

    Raises:
        SchemaError: ``tp`` has no schema the API accepts; the message names the field.
    """
    return _cached_schema(tp, what) if _hashable(tp) else _build_schema(tp, what)


def output_schema_for(output: Any) -> OutputSchema:
    """An ``output_schema`` from a type, a ``str`` (text description) or a ready schema.

    ``JsonSchema``/``TextSchema``/``AutoSchema`` and strings pass through; a dict is taken as
    ``{"type": "json", "json_schema": ...}``, ``{"type": "text"|"auto", ...}`` or a bare JSON
    schema, untouched; anything else is a type given to `json_schema_for`.
    """
    if isinstance(output, (str, JsonSchema, TextSchema, AutoSchema)):
        return output
    if isinstance(output, Mapping):
        return _schema_from_mapping(output)
    return json_schema_for(output)


def input_schema_for(input_type: Any) -> JsonSchema | TextSchema | str:
    """An ``input_schema`` from a type, a ``str`` (text description) or a ready schema."""
    if isinstance(input_type, (str, JsonSchema, TextSchema)):
        return input_type
    if isinstance(input_type, Mapping):
        schema = _schema_from_mapping(input_type)
        if isinstance(schema, AutoSchema):
            raise InvalidArgumentError("an input schema cannot be 'auto'")
        return schema
    return json_schema_for(input_type, what="input")


def output_task_spec(output: Any, *, input_schema: Any = None) -> TaskSpec:
    """A `TaskSpec` for ``execute(output=...)``: a type, ``str``, schema or ``TaskSpec``.

    ``input_schema`` (a type, ``str`` or schema) is added when given.
    """
    if isinstance(output, TaskSpec):
        if input_schema is None:
            return output
        return msgspec.structs.replace(output, input_schema=input_schema_for(input_schema))
    return TaskSpec(
        output_schema=output_schema_for(output),
        input_schema=None if input_schema is None else input_schema_for(input_schema),
    )


def output_type_of(output: Any) -> Any | None:
    """The type to decode results into for ``output``, or ``None`` for schemas and strings."""
    return None if output is None or isinstance(output, _SCHEMA_TYPES) else output


def _schema_from_mapping(m: Mapping[str, Any]) -> JsonSchema | TextSchema | AutoSchema:
    kind = m.get("type")
    if "json_schema" in m and kind in (None, "json"):
        return JsonSchema(json_schema=dict(m["json_schema"]))
    if kind == "text" and "properties" not in m:
        return TextSchema(description=m.get("description"))
    if kind == "auto":
        return AutoSchema()
    return JsonSchema(json_schema=dict(m))


@functools.lru_cache(maxsize=1024)
def _cached_schema(tp: Any, what: str) -> JsonSchema:
    return _build_schema(tp, what)


def _build_schema(tp: Any, what: str) -> JsonSchema:
    root_name = tp.__name__ if isinstance(tp, type) else repr(tp)
    try:
        info = mi.type_info(tp)
        (root,), components = msgspec.json.schema_components([tp], ref_template="{name}")
    except (TypeError, ValueError) as exc:
        raise SchemaError(root_name, f"no JSON schema for this type ({exc})") from exc
    for component in components.values():  # a class's description is its docstring's summary
        if "description" in component:
            component["description"] = _summary(component["description"])
            if not component["description"]:
                del component["description"]
    builder = _Builder(components, _field_docs(info, components), what)
    schema = builder.node(root, root_name, 1, ())
    if "anyOf" in schema or schema.get("type") != "object":
        kind = "a union" if "anyOf" in schema else f"type {schema.get('type', 'any')!r}"
        need = "one object type (a Struct, dataclass or TypedDict)"
        raise SchemaError(root_name, f"the {what} schema must be {need}, not {kind}")
    return JsonSchema(json_schema=schema)


class _Builder:
    """Walks msgspec's schema, inlining refs and applying the API's rules (output only)."""

    def __init__(self, components: dict[str, Any], docs: dict[str, dict[str, str]], what: str):
        self.components, self.docs, self.output = components, docs, what == "output"
        self.properties = self.enum_values = 0

    def node(
        self,
        schema: dict[str, Any],
        path: str,
        depth: int,
        refs: tuple[str, ...],
        *,
        docs: dict[str, str] | None = None,
        branch: bool = False,
    ) -> dict[str, Any]:
        """The rewritten ``schema`` of ``path``; ``depth`` counts objects, ``refs`` the inlined."""
        if "$ref" in schema:
            name = schema["$ref"]
            if name in refs:
                why = "a recursive type cannot be inlined into the self-contained schema"
                raise SchemaError(path, f"{name} contains itself; {why} the API needs")
            rest = {k: v for k, v in schema.items() if k != "$ref"}  # the field's Meta wins
            merged = {**self.components[name], **rest}
            return self.node(merged, path, depth, (*refs, name), docs=self.docs.get(name))
        if self.output and None in schema.get("enum", ()):  # Literal[..., None]: nullable enum
            values = [v for v in schema["enum"] if v is not None]
            schema = {k: v for k, v in schema.items() if k != "enum"}
            schema |= (
                {"anyOf": [{"enum": values}, {"type": "null"}]} if values else {"type": "null"}
            )
        out: dict[str, Any] = {}
        hints: list[str] = []
        for key, value in schema.items():
            if key == "properties":
                self.properties += len(value)
                if self.output and self.properties > MAX_PROPERTIES:
                    raise SchemaError(path, f"more than {MAX_PROPERTIES} properties in all")
                own = docs or {}
                out[key] = {
                    n: self.node(_describe(sub, own.get(n)), f"{path}.{n}", depth + 1, refs)
                    for n, sub in value.items()
                }
            elif key in ("items", "additionalProperties", "prefixItems", "anyOf"):
                out[key] = self.nested(key, value, path, depth, refs)
            elif not self.output or key in _KEPT:
                out[key] = value
            elif key in _HINTED:
                hints.append(
                    f"{key}: {value if isinstance(value, str) else json.dumps(value, default=str)}"
                )
            elif key not in _DROPPED:
                raise SchemaError(path, f"JSON Schema keyword {key!r} is not supported by the API")
        if self.output:
            self.check(out, path, depth, branch=branch)
            if hints:  # the model never sees validation keywords: say them in words
                note = f"[{'; '.join(hints)}]"
                out["description"] = f"{out.get('description', '')} {note}".lstrip()
        return out

    def nested(self, key: str, value: Any, path: str, depth: int, refs: tuple[str, ...]) -> Any:
        """The value of a keyword holding subschemas."""
        if key == "anyOf":
            return [self.node(v, path, depth, refs, branch=True) for v in value]
        if isinstance(value, bool):  # items: false, additionalProperties: false
            return value
        if self.output and key != "items":
            kind = "tuples" if key == "prefixItems" else "dicts with free-form keys"
            raise SchemaError(path, f"{kind} are not supported in output schemas; use a Struct")
        if key == "prefixItems":
            return [self.node(v, f"{path}[{i}]", depth, refs) for i, v in enumerate(value)]
        suffix, deeper = ("[]", 0) if key == "items" else (".*", 1)
        return self.node(value, path + suffix, depth + deeper, refs)

    def check(self, out: dict[str, Any], path: str, depth: int, *, branch: bool) -> None:
        """Apply the API's output rules to one rewritten node."""
        kind = out.get("type")
        if kind == "object":
            if not out.get("properties"):
                what = "objects without named fields (dict, empty classes)"
                raise SchemaError(path, f"{what} are not supported in outputs; use a Struct")
            if depth > MAX_DEPTH:
                raise SchemaError(path, f"objects nested {depth} deep; the API allows {MAX_DEPTH}")
            out["required"] = list(out["properties"])
            out["additionalProperties"] = False
        elif kind == "null" and not branch:
            raise SchemaError(path, "a field that can only be null is not allowed")
        elif "enum" in out:
            self.enum_values += len(out["enum"])
            if self.enum_values > MAX_ENUM_VALUES:
                raise SchemaError(path, f"more than {MAX_ENUM_VALUES} enum values in all")
            kinds = {_json_type(v) for v in out["enum"]}
            if len(kinds) == 1 and None not in kinds:  # a typed enum reads better to a model
                out.setdefault("type", kinds.pop())
        elif kind is None and "anyOf" not in out and "const" not in out:
            raise SchemaError(path, "a field of any type (typing.Any) is not supported")


def _describe(schema: dict[str, Any], doc: str | None) -> dict[str, Any]:
    """``schema`` with a docstring description, unless the field has its own (Meta)."""
    return schema if doc is None or "description" in schema else {**schema, "description": doc}


def _hashable(tp: Any) -> bool:
    try:
        hash(tp)
    except TypeError:  # e.g. Annotated with an unhashable Meta: build without the cache
        return False
    return True


def _json_type(value: Any) -> str | None:
    for py, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if isinstance(value, py):
            return name
    return None


def _summary(doc: str) -> str:
    """A docstring's text before its first section header (``Attributes:``, ``Args:``...)."""
    lines = inspect.cleandoc(doc).splitlines()
    end = next((i for i, line in enumerate(lines) if _SECTION.fullmatch(line.strip())), None)
    return "\n".join(lines[:end]).strip()


def _attribute_docs(doc: str) -> dict[str, str]:
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


def _field_docs(info: mi.Type, components: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per component name: field (wire) name -> description from the class docstrings."""
    out: dict[str, dict[str, str]] = {}
    seen: set[Any] = set()

    def visit(t: mi.Type) -> None:
        if isinstance(t, (mi.StructType, mi.DataclassType, mi.TypedDictType, mi.NamedTupleType)):
            if t.cls in seen:
                return
            seen.add(t.cls)
            docs: dict[str, str] = {}
            for klass in reversed(getattr(t.cls, "__origin__", t.cls).__mro__):
                if klass.__module__ not in ("builtins", "typing", "msgspec") and klass.__doc__:
                    docs.update(_attribute_docs(klass.__doc__))
            name = _component_name(t.cls, components)
            if docs and name is not None:
                out[name] = {f.encode_name: docs[f.name] for f in t.fields if f.name in docs}
            for f in t.fields:
                visit(f.type)
        elif isinstance(t, mi.Metadata):
            visit(t.type)
        elif isinstance(t, mi.CollectionType):
            visit(t.item_type)
        elif isinstance(t, (mi.DictType, mi.FrozenDictType)):
            visit(t.value_type)
        elif isinstance(t, (mi.UnionType, mi.TupleType)):
            for sub in t.types if isinstance(t, mi.UnionType) else t.item_types:
                visit(sub)

    visit(info)
    return out


def _component_name(cls: Any, components: dict[str, Any]) -> str | None:
    """The name msgspec gave ``cls``'s component: its short name, or its full one on clashes."""
    origin = getattr(cls, "__origin__", cls)
    short = origin.__name__
    if origin is not cls:
        args = ", ".join(a.__name__ if isinstance(a, type) else repr(a) for a in cls.__args__)
        short = f"{short}[{args}]"
    full = f"{origin.__module__}.{getattr(cls, '__qualname__', origin.__qualname__)}"
    for candidate in (short, full):
        name = re.sub(r"[^a-zA-Z0-9.\-_]", "_", candidate)
        if name in components:
            return name
    return None


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
        OutputValidationError: the content does not fit ``output_type``, or the output is text.
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
    return ParsedTaskRunResult(
        output=ParsedTaskRunJsonOutput(parsed=parsed, raw=output), result=result
    )

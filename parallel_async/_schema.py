"""JSON schemas built from Python types, for typed outputs and inputs (decoding: ``_typed``).

Any type ``msgspec.json.schema`` supports with an object at the root works: a ``msgspec.Struct``,
a dataclass, a ``TypedDict``. Schemas are built once per type, every ``$ref`` inlined (the API
needs a self-contained schema). Output schemas follow the API's rules (task-api.md §5.2):

* every object gets ``required`` = all its properties and ``additionalProperties: false`` (a
  field with a default is required too); ``Optional[T]`` -> ``anyOf: [T, {"type": "null"}]``;
  ``Literal``/``Enum`` -> ``enum``; defaults, titles and ``discriminator`` are dropped;
* **stripped**: validation-only keywords (``_HINTED``: ``Meta(ge=..., max_length=...)``, the
  ``format`` of a ``date``, ``UUID``...). The model is told them in the field's description, as
  ``[maximum: 150]`` or ``[format: date (YYYY-MM-DD)]``, and decoding still enforces them. A
  ``datetime`` or ``time`` gets its format too, though msgspec states one only for
  ``Meta(tz=True)``;
* **refused** with a `SchemaError` naming the field (``Company.address.zip``): a type msgspec
  itself refuses (an untagged union of Structs...), a root that is not one object type,
  recursive types, ``dict`` and empty objects, tuples, ``typing.Any``, a bare ``None``, other
  keywords (``Meta(extra_json_schema=...)``), more than ``MAX_DEPTH`` nested objects (the root
  is 1, arrays add none), ``MAX_PROPERTIES`` properties or ``MAX_ENUM_VALUES`` enum values in all.

Every schema built from a type, and every `TaskSpec` with such a part, is at most
``MAX_TASK_SPEC_CHARS`` characters of JSON (the API's task spec limit, input and output schemas
together), else `SchemaError` names the field with the longest description. The API's other
size limit, task spec + input, can only be checked once the input is known.

Input schemas are less strict (the API reads them only as a description of the input): refs are
inlined, recursion and non-object roots refused, the rest kept as msgspec made it.

Descriptions: ``msgspec.Meta(description=...)`` wins, else the Google-style ``Attributes:`` (or
``Fields:``) section of the class docstrings along the MRO (``name: text`` or
``name (type): text``, indented continuation lines joined). A class is described by its
docstring's text before its first section. Source code is never read.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
from collections.abc import Iterator, Mapping
from typing import (
    Annotated,
    Any,
    Literal,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

import msgspec
import msgspec.inspect as mi

from ._docstrings import attribute_docs, summary
from ._errors import InvalidArgumentError, SchemaError
from ._models import (
    AutoSchema,
    JsonSchema,
    OutputSchema,
    TaskSpec,
    TextSchema,
)
from ._schema_rules import MAX_DEPTH, MAX_ENUM_VALUES, MAX_PROPERTIES, Builder

__all__ = [
    "MAX_DEPTH",
    "MAX_ENUM_VALUES",
    "MAX_PROPERTIES",
    "MAX_TASK_SPEC_CHARS",
    "SchemaError",
    "input_schema_for",
    "json_schema_for",
    "output_schema_for",
    "output_task_spec",
    "output_type_of",
]

MAX_TASK_SPEC_CHARS = 15_000  # the encoded task spec, input and output schemas together (§5.2)
_SCHEMA_TYPES = (str, Mapping, JsonSchema, TextSchema, AutoSchema, TaskSpec)
_CLASS_TYPES = (mi.StructType, mi.DataclassType, mi.TypedDictType, mi.NamedTupleType)


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

    Raises:
        SchemaError: a type has no schema the API accepts, or a part built from a type makes
            the spec longer than ``MAX_TASK_SPEC_CHARS``.
    """
    if isinstance(output, TaskSpec):
        if input_schema is None:
            return output
        spec = msgspec.structs.replace(output, input_schema=input_schema_for(input_schema))
    else:
        spec = TaskSpec(
            output_schema=output_schema_for(output),
            input_schema=None if input_schema is None else input_schema_for(input_schema),
        )
    typed = [t for t in (output, input_schema) if output_type_of(t) is not None]
    if typed:  # ready schemas alone are the API's to judge
        parts = [
            _spec_part(spec.output_schema, output, "output_schema"),
            _spec_part(spec.input_schema, input_schema, "input_schema"),
        ]
        _check_size(spec, parts, "the task spec", _type_name(typed[0]))
    return spec


def output_type_of(output: Any) -> Any | None:
    """The type to decode results into for ``output``, or ``None`` for schemas and strings."""
    return None if output is None or isinstance(output, _SCHEMA_TYPES) else output


def _spec_part(schema: Any, source: Any, label: str) -> tuple[Any, str]:
    """A task spec part as (JSON schema or text description, the name its paths start with)."""
    if isinstance(schema, JsonSchema):
        typed = output_type_of(source) is not None
        return schema.json_schema, _type_name(source) if typed else label
    if isinstance(schema, TextSchema):
        return {"description": schema.description}, label
    return ({"description": schema} if isinstance(schema, str) else None), label


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else repr(tp)


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
    root_name = _type_name(tp)
    try:
        info = mi.type_info(tp)
        (root,), components = msgspec.json.schema_components([tp], ref_template="{name}")
    except (TypeError, ValueError) as exc:  # msgspec names the type, not where it is: find it
        path = _refused_part(tp, root_name, frozenset()) or root_name
        raise SchemaError(path, f"no JSON schema for this type ({exc})") from exc
    for component in components.values():  # a class's description is its docstring's summary
        if "description" in component:
            component["description"] = summary(component["description"])
            if not component["description"]:
                del component["description"]
    if what == "output":
        _add_time_formats(info, components)
    builder = Builder(components, _field_docs(info, components), what)
    schema = builder.node(root, root_name, 1, ())
    if "anyOf" in schema or schema.get("type") != "object":
        kind = "a union" if "anyOf" in schema else f"type {schema.get('type', 'any')!r}"
        need = "one object type (a Struct, dataclass or TypedDict)"
        raise SchemaError(root_name, f"the {what} schema must be {need}, not {kind}")
    result = JsonSchema(json_schema=schema)
    _check_size(result, [(schema, root_name)], f"the {what} schema", root_name)
    return result


def _check_size(spec: Any, parts: list[tuple[Any, str]], subject: str, root: str) -> None:
    """Refuse ``spec`` (encoded as sent) over ``MAX_TASK_SPEC_CHARS``, naming the field with the
    longest description in ``parts`` (schema, path prefix), else ``root``."""
    size = len(msgspec.json.encode(spec).decode())
    if size <= MAX_TASK_SPEC_CHARS:
        return
    over = (
        f"{subject} is {size:,} characters of JSON, over the {MAX_TASK_SPEC_CHARS:,} the API "
        "allows for a task spec (its input and output schemas together)"
    )
    found = [d for schema, prefix in parts for d in _descriptions(schema, prefix)]
    if not found:
        raise SchemaError(root, f"{over}; use fewer fields, shorter names or fewer enum values")
    length, path = max(found, key=lambda d: d[0])  # the first of the longest
    raise SchemaError(
        path,
        f"{over}; this field has the longest description ({length:,} characters): shorten it "
        "or the other descriptions",
    )


def _descriptions(node: Any, path: str) -> Iterator[tuple[int, str]]:
    """(length, path) of every description in a JSON schema, paths as in `SchemaError`."""
    if isinstance(node, list):  # anyOf
        for branch in node:
            yield from _descriptions(branch, path)
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("description"), str):
        yield len(node["description"]), path
    properties = node.get("properties")
    for name, sub in properties.items() if isinstance(properties, dict) else ():
        yield from _descriptions(sub, f"{path}.{name}")
    yield from _descriptions(node.get("items"), f"{path}[]")
    yield from _descriptions(node.get("additionalProperties"), f"{path}.*")
    yield from _descriptions(node.get("anyOf"), path)


def _refused_part(tp: Any, path: str, seen: frozenset[Any]) -> str | None:
    """Where msgspec's refusal of ``tp`` comes from: the path of its innermost refused part.

    ``None`` when the refusal comes from a class already being searched (a recursive type):
    the culprit is then found along another path.
    """
    key = tp if _hashable(tp) else id(tp)
    if key in seen:
        return None
    seen |= {key}
    culprit: str | None = path
    for sub, sub_path in _parts(tp, path):
        if _refused(sub):
            if (found := _refused_part(sub, sub_path, seen)) is not None:
                return found
            culprit = None  # refused because of a part being searched elsewhere
    return culprit


def _refused(tp: Any) -> bool:
    try:
        msgspec.json.schema_components([tp])
    except (TypeError, ValueError):
        return True
    return False


def _parts(tp: Any, path: str) -> list[tuple[Any, str]]:
    """The types ``tp`` is made of, each with its path: fields, items, union members..."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return [(args[0], path)]
    if origin in (Union, types.UnionType):
        return [(a, path) for a in args]
    if (fields := _fields(tp)) is not None:
        return [(t, f"{path}.{name}") for name, t in fields]
    if not isinstance(origin, type) or origin is type:
        return []  # Literal, a bare class...
    if issubclass(origin, Mapping):
        return [(a, path if i == 0 else f"{path}.*") for i, a in enumerate(args[:2])]
    if issubclass(origin, tuple):
        return [(a, f"{path}[{i}]") for i, a in enumerate(args) if a is not Ellipsis]
    return [(a, f"{path}[]") for a in args]


def _fields(tp: Any) -> list[tuple[str, Any]] | None:
    """(wire name, type) of each field of a Struct, dataclass, TypedDict, NamedTuple or attrs
    class; ``None`` for other types."""
    cls = get_origin(tp) or tp
    if not isinstance(cls, type):
        return None
    try:
        if issubclass(cls, msgspec.Struct):
            return [(f.encode_name, f.type) for f in msgspec.structs.fields(tp)]
        named_tuple = issubclass(cls, tuple) and hasattr(cls, "_fields")
        attrs = hasattr(cls, "__attrs_attrs__")
        if not (dataclasses.is_dataclass(cls) or is_typeddict(cls) or named_tuple or attrs):
            return None
        hints = get_type_hints(cls, include_extras=True)
    except (TypeError, NameError, AttributeError):  # unresolvable annotations: no deeper
        return []
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else hints
    return [(name, hints[name]) for name in names if name in hints]


def _add_time_formats(info: mi.Type, components: dict[str, Any]) -> None:
    """Give datetime and time fields the ``format`` msgspec leaves out (it states one only for
    ``Meta(tz=True)``), so that their description can say it."""
    for t in _classes(info):
        name = _component_name(t.cls, components)
        properties = components[name].get("properties", {}) if name is not None else {}
        for f in t.fields:
            _add_time_format(properties.get(f.encode_name), f.type)


def _add_time_format(node: Any, t: mi.Type) -> None:
    """``node`` is msgspec's schema of ``t``; a ``$ref`` is a class, handled on its own."""
    while isinstance(t, mi.Metadata):
        t = t.type
    if not isinstance(node, dict) or "$ref" in node:
        return
    if isinstance(t, (mi.DateTimeType, mi.TimeType)) and "format" not in node:
        kind = "date-time" if isinstance(t, mi.DateTimeType) else "time"
        node["format"] = f"local-{kind}" if t.tz is False else kind
    elif isinstance(t, mi.CollectionType):
        _add_time_format(node.get("items"), t.item_type)
    elif isinstance(t, mi.UnionType):
        # a union holds at most one str-like and one array-like type: match branches by type
        members = {_json_kind(m): m for m in t.types}
        members.pop(None, None)
        for branch in node.get("anyOf", ()):
            if isinstance(branch, dict) and (member := members.get(branch.get("type"))):
                _add_time_format(branch, member)


def _json_kind(t: mi.Type) -> str | None:
    """``"string"`` for a datetime or time, ``"array"`` for a list-like, else ``None``."""
    while isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, (mi.DateTimeType, mi.TimeType)):
        return "string"
    return "array" if isinstance(t, mi.CollectionType) else None


def _hashable(tp: Any) -> bool:
    try:
        hash(tp)
    except TypeError:  # e.g. Annotated with an unhashable Meta: build without the cache
        return False
    return True


def _field_docs(info: mi.Type, components: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per component name: field (wire) name -> description from the class docstrings."""
    out: dict[str, dict[str, str]] = {}
    for t in _classes(info):
        docs: dict[str, str] = {}
        for klass in reversed(getattr(t.cls, "__origin__", t.cls).__mro__):
            if klass.__module__ not in ("builtins", "typing", "msgspec") and klass.__doc__:
                docs.update(attribute_docs(klass.__doc__))
        name = _component_name(t.cls, components)
        if docs and name is not None:
            out[name] = {f.encode_name: docs[f.name] for f in t.fields if f.name in docs}
    return out


def _classes(info: mi.Type) -> list[Any]:
    """Every Struct, dataclass, TypedDict and NamedTuple type in ``info``, once each."""
    out: dict[Any, Any] = {}

    def visit(t: mi.Type) -> None:
        if isinstance(t, _CLASS_TYPES):
            if t.cls in out:
                return
            out[t.cls] = t
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
    return list(out.values())


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

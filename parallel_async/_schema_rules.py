"""The API's rules for output schemas, applied node by node to msgspec's schema (``_schema``).

`Builder` walks the schema msgspec made of a type, inlining every ``$ref`` and, for an output
schema, rewriting each node as the API needs it (task-api.md §5.2): ``required`` and
``additionalProperties: false`` on every object, validation keywords (``_HINTED``) restated
in the description, annotations (``_DROPPED``) dropped, and the limits (`MAX_DEPTH`,
`MAX_PROPERTIES`, `MAX_ENUM_VALUES`) and unsupported shapes refused with a `SchemaError`
naming the field. Input schemas are only inlined.
"""

from __future__ import annotations

import json
from typing import Any

from ._errors import SchemaError

__all__ = ["MAX_DEPTH", "MAX_ENUM_VALUES", "MAX_PROPERTIES", "Builder"]

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
# How a ``format`` reads in a description. ``local-date-time`` is ours (msgspec states no format
# for a naive-only datetime); unknown formats (``Meta(extra_json_schema=...)``) read as they are.
_FORMATS = {
    "date-time": "date-time (RFC 3339, e.g. 2024-01-31T09:30:00Z)",
    "local-date-time": "date-time without a UTC offset (e.g. 2024-01-31T09:30:00)",
    "date": "date (YYYY-MM-DD)",
    "time": "time (RFC 3339, e.g. 09:30:00Z)",
    "partial-time": "time without a UTC offset (e.g. 09:30:00)",
    "duration": "duration (ISO 8601, e.g. P1DT2H30M)",
    "uuid": "uuid (e.g. 123e4567-e89b-12d3-a456-426614174000)",
    "decimal": 'decimal (a number written as a string, e.g. "12.50")',
}
# Annotations that mean nothing to the model (defaults are moot: every field is required).
_DROPPED = frozenset({"default", "title", "discriminator", "$comment", "deprecated"})
_KEPT = frozenset({"type", "description", "enum", "const", "required"})


class Builder:
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
                text = value if isinstance(value, str) else json.dumps(value, default=str)
                hints.append(f"{key}: {_FORMATS.get(text, text) if key == 'format' else text}")
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


def _json_type(value: Any) -> str | None:
    for py, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if isinstance(value, py):
            return name
    return None

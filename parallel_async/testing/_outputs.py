"""Output generation: plausible ``TaskRunJsonOutput`` / ``TaskRunTextOutput`` payloads.

JSON content is generated from the run's own ``json_schema`` so that it validates
against it: every property is filled (required or not), enums take their first value,
``anyOf``/``oneOf`` their first non-null branch and ``$ref`` is followed into
``$defs``/``definitions``. Values derive from a CRC of the run id and the field path,
so one run always gets the same output and no random generator is needed.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["AUTO_SCHEMA", "OutputKind", "build_output", "output_kind"]

OutputKind = Literal["json", "text", "auto"]

# The schema an auto-schema run "chooses"; echoed in ``output.output_schema``.
AUTO_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "description": "Direct answer to the task."},
        "key_facts": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Supporting facts.",
        },
        "confidence_score": {"type": "number", "description": "Self-assessed confidence."},
    },
    "required": ["answer", "key_facts", "confidence_score"],
    "additionalProperties": False,
}

# Beyond this depth objects keep only required properties and arrays stay empty, so
# recursive ``$ref`` schemas terminate; the hard limit guards pathological schemas.
_SOFT_DEPTH = 6
_HARD_DEPTH = 32
_CONFIDENCE = ("high", "medium", "low")


def output_kind(task_input: Mapping[str, Any]) -> tuple[OutputKind, Any]:
    """Return the output kind of a (validated) create body and its schema payload.

    The payload is the ``json_schema`` object for ``"json"``, the description (or
    ``None``) for ``"text"`` and ``None`` for ``"auto"``.
    """
    spec = task_input.get("task_spec")
    if not isinstance(spec, dict):
        return "auto", None
    schema = spec.get("output_schema")
    if isinstance(schema, str):
        return "text", schema
    if not isinstance(schema, dict):
        return "auto", None
    kind = schema.get("type")
    if kind == "json" or (kind is None and "json_schema" in schema):
        return "json", schema.get("json_schema")
    if kind == "auto":
        return "auto", None
    return "text", schema.get("description")


def build_output(
    task_input: Mapping[str, Any], run_id: str, content: object | None = None
) -> dict[str, Any]:
    """Build the ``output`` object of a completed run's ``TaskRunResult``.

    ``content`` overrides generation: a ``str`` becomes a text output, a mapping a JSON
    output (it is used as given, even if it breaks the run's schema: tests may want that).
    """
    kind, schema = output_kind(task_input)
    if isinstance(content, str):
        return _text_output(content, run_id)
    if isinstance(content, Mapping):
        data = dict(content)
        echoed = _infer_schema(data) if kind == "auto" else None
        return _json_output(data, run_id, echoed)
    if kind == "text":
        return _text_output(_report(task_input, schema, run_id), run_id)
    if kind == "json" and isinstance(schema, dict):
        generated = _Generator(schema, run_id).value(schema, "", 0)
        return _json_output(generated if isinstance(generated, dict) else {}, run_id, None)
    auto = _Generator(AUTO_SCHEMA, run_id).value(AUTO_SCHEMA, "", 0)
    return _json_output(auto, run_id, dict(AUTO_SCHEMA))


def _basis(field: str, run_id: str) -> dict[str, Any]:
    short = run_id[-8:]
    return {
        "field": field,
        "reasoning": f"The value of '{field}' was cross-checked across the cited sources.",
        "citations": [
            {
                "url": f"https://example.com/fake-parallel/{short}/{field}",
                "title": f"Source for {field}",
                "excerpts": [f"Excerpt supporting {field}."],
            }
        ],
        "confidence": _CONFIDENCE[zlib.crc32(f"{run_id}:{field}".encode()) % 3],
    }


def _json_output(
    content: dict[str, Any], run_id: str, output_schema: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "type": "json",
        "content": content,
        "basis": [_basis(str(field), run_id) for field in content],
        "output_schema": output_schema,
        "mcp_tool_calls": None,
        "beta_fields": None,
    }


def _text_output(content: str, run_id: str) -> dict[str, Any]:
    return {
        "type": "text",
        "content": content,
        "basis": [_basis("output", run_id)],
        "mcp_tool_calls": None,
        "beta_fields": None,
    }


def _report(task_input: Mapping[str, Any], description: object, run_id: str) -> str:
    question = task_input.get("input")
    topic = question if isinstance(question, str) else ", ".join(map(str, question or {}))
    wanted = description if isinstance(description, str) and description else "A short report."
    return (
        f"# Report\n\n**Task:** {topic[:200]}\n\n**Requested output:** {wanted[:200]}\n\n"
        "## Findings\n\n- First finding, with a supporting source.\n"
        "- Second finding, cross-checked.\n\n"
        f"_Generated by the fake Parallel server for run {run_id}._\n"
    )


def _infer_schema(value: object) -> dict[str, Any]:
    """A minimal JSON schema describing ``value`` (for auto-schema runs given content)."""
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string"}
    if isinstance(value, list):
        return {"type": "array", "items": _infer_schema(value[0]) if value else {}}
    if isinstance(value, Mapping):
        return {
            "type": "object",
            "properties": {str(k): _infer_schema(v) for k, v in value.items()},
            "required": [str(k) for k in value],
            "additionalProperties": False,
        }
    return {"type": "null"}


def _is_null_schema(schema: object) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null"


class _Generator:
    """Walks one JSON schema and produces an instance of it."""

    __slots__ = ("_defs", "_root", "_salt")

    def __init__(self, root: Mapping[str, Any], salt: str) -> None:
        self._root = root
        self._salt = salt
        defs: dict[str, Any] = {}
        for key in ("definitions", "$defs"):
            found = root.get(key)
            if isinstance(found, dict):
                defs.update(found)
        self._defs = defs

    def _hash(self, path: str) -> int:
        return zlib.crc32(f"{self._salt}:{path}".encode())

    def _resolve(self, ref: str) -> Any:
        if ref == "#":
            return self._root
        for prefix in ("#/$defs/", "#/definitions/"):
            if ref.startswith(prefix):
                return self._defs.get(ref[len(prefix) :], {})
        return {}

    def value(self, schema: Any, path: str, depth: int) -> Any:
        if depth > _HARD_DEPTH or not isinstance(schema, dict):
            return None
        if "$ref" in schema:
            return self.value(self._resolve(str(schema["$ref"])), path, depth + 1)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[0]
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list):
                return self._union(branches, path, depth)
        all_of = schema.get("allOf")
        if isinstance(all_of, list):
            return self.value(self._merge(schema, all_of), path, depth)
        return self._typed(schema, path, depth)

    def _union(self, branches: list[Any], path: str, depth: int) -> Any:
        concrete = [b for b in branches if not _is_null_schema(b)]
        # Past the soft depth prefer null when allowed: it ends recursive structures.
        if concrete and (depth < _SOFT_DEPTH or len(concrete) == len(branches)):
            return self.value(concrete[0], path, depth)
        return None

    def _merge(self, schema: dict[str, Any], parts: list[Any]) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        properties: dict[str, Any] = dict(merged.get("properties", {}))
        required: list[Any] = list(merged.get("required", []))
        for part in parts:
            resolved = self._resolve(part["$ref"]) if "$ref" in part else part
            if not isinstance(resolved, dict):
                continue
            for key, item in resolved.items():
                if key == "properties" and isinstance(item, dict):
                    properties.update(item)
                elif key == "required" and isinstance(item, list):
                    required.extend(item)
                else:
                    merged.setdefault(key, item)
        if properties:
            merged["properties"] = properties
            merged.setdefault("type", "object")
        merged["required"] = required
        return merged

    def _typed(self, schema: dict[str, Any], path: str, depth: int) -> Any:
        kind = schema.get("type")
        if isinstance(kind, list):
            non_null = [k for k in kind if k != "null"]
            kind = non_null[0] if non_null else "null"
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else ""
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, depth)
        if kind == "integer":
            return self._number(schema, path, integer=True)
        if kind == "number":
            return self._number(schema, path, integer=False)
        if kind == "boolean":
            return self._hash(path) % 2 == 0
        if kind == "null":
            return None
        return self._string(schema, path)

    def _object(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        required = schema.get("required")
        keep = set(required) if isinstance(required, list) else set()
        result: dict[str, Any] = {}
        for name, sub in properties.items():
            if depth >= _SOFT_DEPTH and name not in keep:
                continue
            result[name] = self.value(sub, f"{path}.{name}" if path else name, depth + 1)
        return result

    def _array(self, schema: dict[str, Any], path: str, depth: int) -> list[Any]:
        count = 0 if depth >= _SOFT_DEPTH else 1 + self._hash(path) % 2
        low, high = schema.get("minItems"), schema.get("maxItems")
        if isinstance(low, int):
            count = max(count, low)
        if isinstance(high, int):
            count = min(count, high)
        items = schema.get("items", {})
        return [self.value(items, f"{path}.{i}", depth + 1) for i in range(count)]

    def _number(self, schema: dict[str, Any], path: str, *, integer: bool) -> float | int:
        seed = self._hash(path)
        value: float = seed % 100 if integer else (seed % 10_000) / 100 + 0.25
        low, high = schema.get("minimum"), schema.get("maximum")
        if isinstance(low, (int, float)):
            value = max(value, low)
        if isinstance(high, (int, float)):
            value = min(value, high)
        return int(value) if integer else float(value)

    def _string(self, schema: dict[str, Any], path: str) -> str:
        fmt = schema.get("format")
        if fmt == "date":
            return "2025-01-15"
        if fmt == "date-time":
            return "2025-01-15T12:00:00Z"
        name = path.rsplit(".", 1)[-1] or "value"
        text = f"Sample {name} {self._hash(path) % 0xFFFF:04x}"
        low, high = schema.get("minLength"), schema.get("maxLength")
        if isinstance(low, int) and len(text) < low:
            text = text.ljust(low, "x")
        if isinstance(high, int):
            text = text[:high]
        return text

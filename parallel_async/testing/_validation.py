"""Validation of ``TaskRunInput`` bodies (the create request).

The checks follow the official schema: required ``input`` and ``processor``, typed
optional fields, the documented metadata limits and the output-schema rules the
service enforces (JSON root must be an object with ``properties``). Problems are
collected, not raised, so one 422 lists every failing field like the real service.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

__all__ = ["PROCESSORS", "FieldError", "validate_metadata", "validate_task_run_input"]

_BASE_PROCESSORS = (
    "lite",
    "base",
    "core",
    "core2x",
    "pro",
    "ultra",
    "ultra2x",
    "ultra4x",
    "ultra8x",
)
PROCESSORS: frozenset[str] = frozenset(
    (*_BASE_PROCESSORS, *(f"{name}-fast" for name in _BASE_PROCESSORS))
)
"""Processor names the fake accepts; anything else is answered with 403."""

METADATA_KEY_MAX = 16
METADATA_VALUE_MAX = 512
_MEMORY_SCOPE_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

Loc = tuple[str | int, ...]


class FieldError(TypedDict):
    """One failing field, reported in the 422 ``detail.errors`` list."""

    loc: list[str | int]
    msg: str
    type: str


class _Errors:
    """Accumulates field errors with their location in the body."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def add(self, loc: Loc, msg: str, kind: str) -> None:
        self.items.append({"loc": ["body", *loc], "msg": msg, "type": kind})


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_number(value: object) -> bool:
    # bool is an int subclass in Python but a distinct JSON type.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_str_list(value: object, loc: Loc, errors: _Errors) -> None:
    if not isinstance(value, list):
        errors.add(loc, "Input should be a valid list", "list_type")
        return
    for index, item in enumerate(value):
        if not isinstance(item, str):
            errors.add((*loc, index), "Input should be a valid string", "string_type")


def _check_metadata(value: object, errors: _Errors) -> None:
    if not isinstance(value, dict):
        errors.add(("metadata",), "Input should be a valid dictionary", "dict_type")
        return
    for key, item in value.items():
        loc: Loc = ("metadata", key)
        if len(key) > METADATA_KEY_MAX:
            errors.add(
                loc, f"Metadata keys must be at most {METADATA_KEY_MAX} characters", "too_long"
            )
        if isinstance(item, str):
            if len(item) > METADATA_VALUE_MAX:
                errors.add(
                    loc,
                    f"Metadata values must be at most {METADATA_VALUE_MAX} characters",
                    "too_long",
                )
        elif not (_is_number(item) or isinstance(item, bool)):
            errors.add(loc, "Metadata values must be strings, numbers or booleans", "type")


def _check_json_schema(
    value: Mapping[str, Any], loc: Loc, errors: _Errors, *, output: bool
) -> None:
    kind = value.get("type", "json")
    if kind != "json":
        errors.add((*loc, "type"), "Input should be 'json'", "literal_error")
    schema = value.get("json_schema")
    if not isinstance(schema, dict):
        errors.add((*loc, "json_schema"), "Field required: a JSON Schema object", "missing")
        return
    if not output:
        return
    # The service rejects these output schemas outright (docs: "specify a task").
    if "anyOf" in schema:
        errors.add((*loc, "json_schema"), "Root anyOf is not supported", "value_error")
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        errors.add(
            (*loc, "json_schema"),
            "The root of an output JSON schema must be 'type: object' with 'properties'",
            "value_error",
        )


def _check_schema(value: object, loc: Loc, errors: _Errors, *, output: bool) -> None:
    """Check an ``output_schema`` or ``input_schema`` (JSON, text, auto or bare string)."""
    if isinstance(value, str):
        return
    if not isinstance(value, dict):
        errors.add(loc, "Input should be a schema object or a string", "model_type")
        return
    kind = value.get("type")
    if kind == "json" or (kind is None and "json_schema" in value):
        _check_json_schema(value, loc, errors, output=output)
    elif kind is None or kind == "text":
        description = value.get("description")
        if description is not None and not isinstance(description, str):
            errors.add((*loc, "description"), "Input should be a valid string", "string_type")
    elif kind == "auto" and output:
        return
    else:
        allowed = "'json', 'text' or 'auto'" if output else "'json' or 'text'"
        errors.add((*loc, "type"), f"Input should be {allowed}", "literal_error")


def _check_task_spec(value: object, errors: _Errors) -> None:
    if not isinstance(value, dict):
        errors.add(("task_spec",), "Input should be a valid dictionary", "model_type")
        return
    if "output_schema" not in value:
        errors.add(("task_spec", "output_schema"), "Field required", "missing")
    else:
        _check_schema(value["output_schema"], ("task_spec", "output_schema"), errors, output=True)
    input_schema = value.get("input_schema")
    if input_schema is not None:
        _check_schema(input_schema, ("task_spec", "input_schema"), errors, output=False)


def _check_source_policy(value: object, errors: _Errors) -> None:
    if not isinstance(value, dict):
        errors.add(("source_policy",), "Input should be a valid dictionary", "model_type")
        return
    for key in ("include_domains", "exclude_domains"):
        if key in value:
            _check_str_list(value[key], ("source_policy", key), errors)
    after = value.get("after_date")
    if after is not None and not (isinstance(after, str) and _DATE.fullmatch(after)):
        errors.add(
            ("source_policy", "after_date"), "Input should be a date (YYYY-MM-DD)", "date_type"
        )


def _check_advanced_settings(value: object, errors: _Errors) -> None:
    if not isinstance(value, dict):
        errors.add(("advanced_settings",), "Input should be a valid dictionary", "model_type")
        return
    location = value.get("location")
    if location is not None and not isinstance(location, str):
        errors.add(
            ("advanced_settings", "location"), "Input should be a valid string", "string_type"
        )


def _check_mcp_servers(value: object, errors: _Errors) -> None:
    if not isinstance(value, list):
        errors.add(("mcp_servers",), "Input should be a valid list", "list_type")
        return
    for index, server in enumerate(value):
        loc: Loc = ("mcp_servers", index)
        if not isinstance(server, dict):
            errors.add(loc, "Input should be a valid dictionary", "model_type")
            continue
        for key in ("name", "url"):
            if not isinstance(server.get(key), str):
                errors.add((*loc, key), "Field required: a string", "missing")
        if server.get("type", "url") != "url":
            errors.add((*loc, "type"), "Input should be 'url'", "literal_error")
        headers = server.get("headers")
        if headers is not None and not (
            isinstance(headers, dict) and all(isinstance(v, str) for v in headers.values())
        ):
            errors.add((*loc, "headers"), "Input should map strings to strings", "dict_type")
        tools = server.get("allowed_tools")
        if tools is not None:
            _check_str_list(tools, (*loc, "allowed_tools"), errors)


def _check_webhook(value: object, errors: _Errors) -> None:
    if not isinstance(value, dict):
        errors.add(("webhook",), "Input should be a valid dictionary", "model_type")
        return
    if not isinstance(value.get("url"), str):
        errors.add(("webhook", "url"), "Field required: a string", "missing")
    event_types = value.get("event_types", [])
    if not isinstance(event_types, list) or any(e != "task_run.status" for e in event_types):
        errors.add(
            ("webhook", "event_types"), "Input should be a list of 'task_run.status'", "enum"
        )


def _check_memory_scope_key(value: object, errors: _Errors) -> None:
    if not (isinstance(value, str) and _MEMORY_SCOPE_KEY.fullmatch(value)):
        errors.add(
            ("memory_scope_key",),
            "Input should be 1-128 characters of letters, digits, '_' or '-'",
            "string_pattern_mismatch",
        )


def _check_scalar(
    name: str, check: Callable[[object], bool], expected: str
) -> Callable[[object, _Errors], None]:
    def run(value: object, errors: _Errors) -> None:
        if not check(value):
            errors.add((name,), f"Input should be a valid {expected}", f"{expected}_type")

    return run


# Optional fields: ``null`` is always accepted, anything else goes to the checker.
_OPTIONAL_FIELDS: dict[str, Callable[[object, _Errors], None]] = {
    "metadata": _check_metadata,
    "task_spec": _check_task_spec,
    "source_policy": _check_source_policy,
    "advanced_settings": _check_advanced_settings,
    "previous_interaction_id": _check_scalar("previous_interaction_id", _is_str, "string"),
    "mcp_servers": _check_mcp_servers,
    "enable_events": _check_scalar(
        "enable_events", lambda value: isinstance(value, bool), "boolean"
    ),
    "webhook": _check_webhook,
    "memory_scope_key": _check_memory_scope_key,
}


def validate_task_run_input(body: object) -> list[FieldError]:
    """Return every problem with a decoded create body; an empty list means valid.

    Unknown top-level fields are ignored, as the real (pydantic-based) service does.
    Whether the processor name exists is *not* checked here: that is a 403, not a 422.
    """
    errors = _Errors()
    if not isinstance(body, dict):
        errors.items.append(
            {"loc": ["body"], "msg": "Input should be a JSON object", "type": "model_type"}
        )
        return errors.items
    if "input" not in body:
        errors.add(("input",), "Field required", "missing")
    elif not isinstance(body["input"], (str, dict)):
        errors.add(("input",), "Input should be a string or a JSON object", "union_type")
    if "processor" not in body:
        errors.add(("processor",), "Field required", "missing")
    elif not isinstance(body["processor"], str):
        errors.add(("processor",), "Input should be a valid string", "string_type")
    for name, check in _OPTIONAL_FIELDS.items():
        value = body.get(name)
        if value is not None:
            check(value, errors)
    return errors.items


def validate_metadata(value: object) -> list[FieldError]:
    """Problems with a ``metadata`` value (``null`` is valid), located at ``body.metadata``."""
    errors = _Errors()
    if value is not None:
        _check_metadata(value, errors)
    return errors.items

"""Contract tests: our wire Structs against the official OpenAPI document.

The document is read from ``../shared/spec/parallel-openapi.json`` beside the repository and never
copied here. Every example the document gives for the task-run endpoints (operation request and
response examples, and the ``example``/``examples`` of the component schemas those endpoints
reach) must decode into our Struct for it without losing a field; the bodies we encode must
validate against the spec's request schema; and what we decode must, once encoded again, still
validate against the schema it came from.

Known mismatches are ``xfail(strict=True)`` with the field and the fix in their reason, so that a
fix turns them into failures ("XPASS(strict)") until the marker is removed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from parallel_async._errors import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PaymentRequiredError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from parallel_async._models import (
    AutoSchema,
    Citation,
    ErrorObject,
    ErrorResponse,
    FieldBasis,
    JsonSchema,
    McpServer,
    McpToolCall,
    RunInput,
    SourcePolicy,
    TaskAdvancedSettings,
    TaskRun,
    TaskRunJsonOutput,
    TaskRunResult,
    TaskRunTextOutput,
    TaskSpec,
    TextSchema,
    Warning,
    Webhook,
)
from parallel_async._protocol import (
    RUN_INPUT_DECODER,
    TASK_RUN_DECODER,
    TASK_RUN_RESULT_DECODER,
    build_run_input,
    decode_run_input,
    encode,
    error_from_response,
)

SPEC_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "spec" / "parallel-openapi.json"
if not SPEC_PATH.is_file():
    pytest.skip(
        f"official OpenAPI document not found at {SPEC_PATH}; contract tests need "
        "../shared/spec/parallel-openapi.json beside the repository",
        allow_module_level=True,
    )

SPEC_URI = "urn:parallel:openapi:contract"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
_RESOURCE: Resource[Any] = Resource.from_contents(SPEC, default_specification=DRAFT202012)
REGISTRY: Registry[Any] = Registry().with_resource(SPEC_URI, _RESOURCE)

RUN_PATHS = (
    "/v1/tasks/runs",
    "/v1/tasks/runs/{run_id}",
    "/v1/tasks/runs/{run_id}/input",
    "/v1/tasks/runs/{run_id}/result",
)
CREATE_BODY_POINTER = "/paths/~1v1~1tasks~1runs/post/requestBody/content/application~1json/schema"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})

# The spec's component schemas and our Struct for each. Every schema the task-run endpoints
# reach must be here (checked by test_every_reachable_schema_has_a_struct).
SCHEMA_STRUCTS: dict[str, type[msgspec.Struct]] = {
    "TaskRun": TaskRun,
    "TaskRunResult": TaskRunResult,
    "TaskRunJsonOutput": TaskRunJsonOutput,
    "TaskRunTextOutput": TaskRunTextOutput,
    "TaskRunInput": RunInput,
    "TaskSpec": TaskSpec,
    "JsonSchema": JsonSchema,
    "TextSchema": TextSchema,
    "AutoSchema": AutoSchema,
    "FieldBasis": FieldBasis,
    "Citation": Citation,
    "Warning": Warning,
    "ErrorResponse": ErrorResponse,
    "Error": ErrorObject,
    "SourcePolicy": SourcePolicy,
    "Webhook": Webhook,
    "McpServer": McpServer,
    "McpToolCall": McpToolCall,
    "TaskAdvancedSettings": TaskAdvancedSettings,
}
STRUCT_SCHEMAS: dict[type[msgspec.Struct], str] = {v: k for k, v in SCHEMA_STRUCTS.items()}

# Fields we send that the spec document does not list (TaskRunInput allows extra properties).
# memory_scope_key is in the official SDK (parallel-web >= 1.3.7) but not in spec 0.1.2.
STRUCT_EXTENSIONS: frozenset[tuple[str, str]] = frozenset({("TaskRunInput", "memory_scope_key")})

# Spec-required properties that encode() would leave out (none left: response Structs set
# omit_defaults=False). An entry here becomes a strict xfail with its reason.
DROPPED_REQUIRED: dict[tuple[str, str], str] = {}

# A small valid instance of each schema, into which the property examples are set.
MINIMAL: dict[str, dict[str, Any]] = {
    "TaskRun": {
        "run_id": "trun_0",
        "interaction_id": "trun_0",
        "status": "queued",
        "is_active": True,
        "processor": "base",
        "created_at": "2025-01-01T00:00:00Z",
        "modified_at": "2025-01-01T00:00:00Z",
    },
    "TaskRunResult": {
        "run": {
            "run_id": "trun_0",
            "interaction_id": "trun_0",
            "status": "completed",
            "is_active": False,
            "processor": "base",
            "created_at": "2025-01-01T00:00:00Z",
            "modified_at": "2025-01-01T00:00:01Z",
        },
        "output": {
            "type": "text",
            "content": "report",
            "basis": [{"field": "output", "reasoning": "r"}],
        },
    },
    "TaskRunJsonOutput": {
        "type": "json",
        "content": {"a": 1},
        "basis": [{"field": "a", "reasoning": "r"}],
    },
    "TaskRunTextOutput": {
        "type": "text",
        "content": "c",
        "basis": [{"field": "output", "reasoning": "r"}],
    },
    "TaskRunInput": {"input": "x", "processor": "base"},
    "TaskSpec": {"output_schema": "the answer"},
    "JsonSchema": {"type": "json", "json_schema": {"type": "object"}},
    "TextSchema": {"type": "text"},
    "AutoSchema": {"type": "auto"},
    "FieldBasis": {"field": "output", "reasoning": "r"},
    "Citation": {"url": "https://example.com"},
    "Warning": {"type": "warning", "message": "m"},
    "ErrorResponse": {"type": "error", "error": {"ref_id": "r", "message": "m"}},
    "Error": {"ref_id": "r", "message": "m"},
    "SourcePolicy": {},
    "Webhook": {"url": "https://example.com/hook"},
    "McpServer": {"name": "n", "url": "https://example.com/mcp"},
    "McpToolCall": {"tool_call_id": "t", "server_name": "n", "tool_name": "x", "arguments": "{}"},
    "TaskAdvancedSettings": {},
}

ERROR_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: PaymentRequiredError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: APIStatusError,  # "still running" on /result: no dedicated class, the poller retries
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}

ENDPOINT_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "TaskRun": TASK_RUN_DECODER,
    "TaskRunResult": TASK_RUN_RESULT_DECODER,
    "TaskRunInput": RUN_INPUT_DECODER,
}

# Floors on what is collected, so that a moved or renamed spec section can't pass vacuously.
MIN_SUCCESS_EXAMPLES = 4
MIN_ERROR_EXAMPLES = 10
MIN_REQUEST_EXAMPLES = 1
MIN_COMPONENT_EXAMPLES = 20


# --- the spec ----------------------------------------------------------------------------------


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _resolve(pointer: str) -> Any:
    node: Any = SPEC
    for escaped in pointer.lstrip("/").split("/"):
        token = escaped.replace("~1", "/").replace("~0", "~")
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node


@functools.cache
def _validator(pointer: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"{SPEC_URI}#{pointer}"}
    return jsonschema.Draft202012Validator(
        schema,
        registry=REGISTRY,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )


def _validate(pointer: str, instance: object) -> None:
    errors = sorted(_validator(pointer).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, "\n".join(
        f"{pointer} at {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in errors
    )


def _schema_pointer(name: str) -> str:
    return f"/components/schemas/{name}"


def _ref_name(schema: Mapping[str, Any]) -> str:
    ref = schema.get("$ref", "")
    assert isinstance(ref, str)
    assert ref.startswith("#/components/schemas/"), f"expected a component $ref, got {schema}"
    return ref.rsplit("/", 1)[-1]


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value.rsplit("/", 1)[-1]
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path in RUN_PATHS:
        for method, operation in SPEC["paths"][path].items():
            if method in HTTP_METHODS:
                yield path, method, operation


def _reachable_schemas() -> set[str]:
    todo = [name for _, _, operation in _operations() for name in _refs(operation)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_refs(SPEC["components"]["schemas"][name]))
    seen.discard("ParallelBeta")  # a header parameter, not a body
    return seen


# --- example collection ------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One example from the spec, where it validates and which Struct it decodes into."""

    id: str
    value: Any
    pointer: str  # JSON pointer of the schema the whole ``document`` validates against
    schema: str  # component schema name of ``document``
    status: int | None = None  # HTTP status, for response examples
    prop: str | None = None  # property name, for examples of a component property

    @property
    def document(self) -> Any:
        """The JSON document to decode: the example, or the example set in a minimal instance."""
        if self.prop is None:
            return self.value
        return {**MINIMAL[self.schema], self.prop: self.value}

    @property
    def struct(self) -> type[msgspec.Struct]:
        return SCHEMA_STRUCTS[self.schema]


def _media_examples(media: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    if "example" in media:
        yield "", media["example"]
    for name, entry in media.get("examples", {}).items():
        example = _resolve(entry["$ref"].removeprefix("#")) if "$ref" in entry else entry
        if "value" in example:
            yield f" [{name}]", example["value"]


def _operation_examples() -> tuple[list[Example], list[Example], list[Example]]:
    requests: list[Example] = []
    successes: list[Example] = []
    errors: list[Example] = []
    for path, method, operation in _operations():
        base = f"/paths/{_escape(path)}/{method}"
        body = operation.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None:
            for suffix, value in _media_examples(body):
                pointer = f"{base}/requestBody/content/application~1json/schema"
                name = _ref_name(body["schema"])
                requests.append(
                    Example(f"{method.upper()} {path} body{suffix}", value, pointer, name)
                )
        for status, response in operation.get("responses", {}).items():
            media = response.get("content", {}).get("application/json")
            if media is None:
                continue
            pointer = f"{base}/responses/{status}/content/application~1json/schema"
            name = _ref_name(media["schema"])
            for suffix, value in _media_examples(media):
                example = Example(
                    f"{method.upper()} {path} {status}{suffix}", value, pointer, name, int(status)
                )
                (successes if status.startswith("2") else errors).append(example)
    return requests, successes, errors


def _examples_in(node: object, where: str, nested: bool = False) -> Iterator[tuple[str, Any, bool]]:
    """(pointer, value, nested) of each example under a property's schema.

    Examples reached only through anyOf/oneOf/allOf are values of the property itself; those
    below ``items``, ``properties``... (``nested``) are values of a part of it.
    """
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _examples_in(item, f"{where}/{index}", nested)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "example":
            yield f"{where}/example", value, nested
        elif key == "examples" and isinstance(value, list):
            for index, item in enumerate(value):
                yield f"{where}/examples/{index}", item, nested
        elif key in ("anyOf", "oneOf", "allOf"):
            yield from _examples_in(value, f"{where}/{key}", nested)
        elif isinstance(value, dict | list) and key not in ("default", "const", "enum"):
            yield from _examples_in(value, f"{where}/{_escape(key)}", nested=True)


def _component_examples() -> tuple[list[Example], list[str]]:
    """The examples in the mapped component schemas, and the pointers of nested ones."""
    found: list[Example] = []
    unplaced: list[str] = []
    for name in SCHEMA_STRUCTS:
        schema = SPEC["components"]["schemas"][name]
        pointer = _schema_pointer(name)
        if "example" in schema:
            found.append(Example(f"{name} (example)", schema["example"], pointer, name))
        for index, value in enumerate(schema.get("examples", [])):
            found.append(Example(f"{name} (examples/{index})", value, pointer, name))
        for prop, subschema in schema.get("properties", {}).items():
            for where, value, nested in _examples_in(subschema, ""):
                if nested:
                    unplaced.append(f"{pointer}/properties/{_escape(prop)}{where}")
                else:
                    found.append(Example(f"{name}.{prop}{where}", value, pointer, name, prop=prop))
    return found, unplaced


REQUEST_EXAMPLES, SUCCESS_EXAMPLES, ERROR_EXAMPLES = _operation_examples()
# GET .../input answers a TaskRunInput: the same schema as the create body.
REQUEST_EXAMPLES += [e for e in SUCCESS_EXAMPLES if e.schema == "TaskRunInput"]
COMPONENT_EXAMPLES, UNPLACED_EXAMPLES = _component_examples()
REQUEST_EXAMPLES += [e for e in COMPONENT_EXAMPLES if e.schema == "TaskRunInput"]
ALL_EXAMPLES = (
    SUCCESS_EXAMPLES
    + ERROR_EXAMPLES
    + COMPONENT_EXAMPLES
    + [e for e in REQUEST_EXAMPLES if e not in SUCCESS_EXAMPLES and e not in COMPONENT_EXAMPLES]
)


def _params(examples: list[Example]) -> list[Any]:
    return [pytest.param(example, id=example.id) for example in examples]


# --- structural comparison -------------------------------------------------------------------


def _fields(struct: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.encode_name: f for f in msgspec.structs.fields(struct)}


def _has_default(field: msgspec.structs.FieldInfo) -> bool:
    return field.default is not msgspec.NODEFAULT or field.default_factory is not msgspec.NODEFAULT


def _assert_preserved(document: Any, value: Any, where: str) -> None:
    """Every key of ``document`` is a field of the decoded ``value``, with an equal value."""
    if isinstance(value, msgspec.Struct):
        assert isinstance(document, dict), f"{where}: expected an object, got {document!r}"
        config = value.__struct_config__
        fields = _fields(type(value))
        for key, item in document.items():
            if key == config.tag_field:
                assert item == config.tag, f"{where}.{key}: tag {item!r} != {config.tag!r}"
                continue
            assert key in fields, (
                f"{where}.{key}: in the spec's example but not a field of "
                f"{type(value).__name__}, so decoding silently drops it"
            )
            _assert_preserved(item, getattr(value, fields[key].name), f"{where}.{key}")
    elif isinstance(value, list):
        assert isinstance(document, list), f"{where}: expected a list, got {document!r}"
        assert len(document) == len(value), where
        for index, (item, decoded) in enumerate(zip(document, value, strict=True)):
            _assert_preserved(item, decoded, f"{where}[{index}]")
    elif isinstance(value, dict):
        assert isinstance(document, dict), f"{where}: expected an object, got {document!r}"
        assert document.keys() == value.keys(), where
        for key, item in document.items():
            _assert_preserved(item, value[key], f"{where}.{key}")
    else:
        assert value == document, f"{where}: decoded {value!r}, spec says {document!r}"
        assert isinstance(value, bool) == isinstance(document, bool), where


def _dropped_required(
    value: object, encoded: object, where: str = "$"
) -> list[tuple[str, str, str]]:
    """(schema, property, location) of each spec-required key missing from ``encoded``.

    ``encoded`` is ``value`` encoded and decoded to builtins. Which defaults msgspec omits
    depends on the value (an empty list always, a string only if it is the default object), so
    this compares with what was actually encoded instead of predicting it.
    """
    found: list[tuple[str, str, str]] = []
    if isinstance(value, msgspec.Struct):
        assert isinstance(encoded, dict)
        schema_name = STRUCT_SCHEMAS[type(value)]
        for prop in SPEC["components"]["schemas"][schema_name].get("required", []):
            if prop not in encoded:
                found.append((schema_name, prop, f"{where}.{prop}"))
        for field in msgspec.structs.fields(value):
            if field.encode_name in encoded:
                found += _dropped_required(
                    getattr(value, field.name),
                    encoded[field.encode_name],
                    f"{where}.{field.encode_name}",
                )
    elif isinstance(value, list):
        assert isinstance(encoded, list)
        for index, (item, encoded_item) in enumerate(zip(value, encoded, strict=True)):
            found += _dropped_required(item, encoded_item, f"{where}[{index}]")
    return found


def _decode(example: Example) -> msgspec.Struct:
    raw = json.dumps(example.document).encode()
    decoded: msgspec.Struct = msgspec.json.decode(raw, type=example.struct)
    return decoded


# --- 0. the mapping itself ---------------------------------------------------------------------


def test_spec_has_the_task_run_endpoints() -> None:
    assert SPEC.get("openapi", "").startswith("3."), "not an OpenAPI 3 document"
    missing = [path for path in RUN_PATHS if path not in SPEC["paths"]]
    assert not missing, f"task-run endpoints missing from the spec: {missing}"


def test_every_reachable_schema_has_a_struct() -> None:
    reachable = _reachable_schemas()
    assert reachable == set(SCHEMA_STRUCTS), (
        f"schemas without a Struct: {sorted(reachable - set(SCHEMA_STRUCTS))}; "
        f"Structs whose schema the endpoints no longer reach: "
        f"{sorted(set(SCHEMA_STRUCTS) - reachable)}"
    )


@pytest.mark.parametrize("name", sorted(SCHEMA_STRUCTS))
def test_struct_fields_match_spec_properties(name: str) -> None:
    schema = SPEC["components"]["schemas"][name]
    struct = SCHEMA_STRUCTS[name]
    config = struct.__struct_config__
    fields = _fields(struct)
    ours = set(fields) | ({config.tag_field} if config.tag_field else set())
    theirs = set(schema.get("properties", {}))
    extensions = {prop for schema_name, prop in STRUCT_EXTENSIONS if schema_name == name}
    assert theirs - ours == set(), f"{name}: spec properties our Struct ignores"
    assert ours - theirs == extensions, f"{name}: Struct fields the spec does not list"
    if extensions:
        # extensions are tolerated only because the spec allows extra properties here
        assert schema.get("additionalProperties", True) is not False
    required = set(schema.get("required", []))
    for prop, field in fields.items():
        if prop not in required and prop in theirs:
            assert _has_default(field), f"{name}.{prop} is optional in the spec; give it a default"


def _required_params() -> list[Any]:
    params: list[Any] = []
    for name, struct in SCHEMA_STRUCTS.items():
        for prop in SPEC["components"]["schemas"][name].get("required", []):
            marks = []
            if (name, prop) in DROPPED_REQUIRED:
                marks.append(pytest.mark.xfail(strict=True, reason=DROPPED_REQUIRED[name, prop]))
            params.append(pytest.param(struct, prop, id=f"{name}.{prop}", marks=marks))
    return params


@pytest.mark.parametrize(("struct", "prop"), _required_params())
def test_spec_required_property_is_always_encoded(struct: type[msgspec.Struct], prop: str) -> None:
    """A key the spec requires is never left out by encode(): no default, or defaults kept."""
    config = struct.__struct_config__
    fields = _fields(struct)
    assert prop in fields or prop == config.tag_field, f"no field for required {prop!r}"
    if prop == config.tag_field:
        return
    assert not _has_default(fields[prop]) or not config.omit_defaults


@pytest.mark.parametrize("name", sorted(SCHEMA_STRUCTS))
def test_minimal_instance_is_valid_and_decodes(name: str) -> None:
    """The bases the property examples are set into are themselves valid and decode."""
    _validate(_schema_pointer(name), MINIMAL[name])
    decoded = msgspec.json.decode(json.dumps(MINIMAL[name]).encode(), type=SCHEMA_STRUCTS[name])
    _assert_preserved(MINIMAL[name], decoded, name)


# --- 1. the spec's examples decode into our Structs ----------------------------------------------


def test_enough_examples_were_collected() -> None:
    assert len(SUCCESS_EXAMPLES) >= MIN_SUCCESS_EXAMPLES, SUCCESS_EXAMPLES
    assert len(ERROR_EXAMPLES) >= MIN_ERROR_EXAMPLES, ERROR_EXAMPLES
    assert len(REQUEST_EXAMPLES) >= MIN_REQUEST_EXAMPLES, REQUEST_EXAMPLES
    assert len(COMPONENT_EXAMPLES) >= MIN_COMPONENT_EXAMPLES, COMPONENT_EXAMPLES
    assert not UNPLACED_EXAMPLES, (
        f"examples nested inside a property (e.g. under items): {UNPLACED_EXAMPLES}; "
        "teach test_contract to check them against the element type"
    )
    with_success = {e.id.split(" ")[1] for e in SUCCESS_EXAMPLES}
    assert with_success == set(RUN_PATHS), "an endpoint lost its 2xx example"


@pytest.mark.parametrize("example", _params(SUCCESS_EXAMPLES))
def test_success_example_decodes(example: Example) -> None:
    _validate(example.pointer, example.value)  # the spec agrees with itself
    decoder = ENDPOINT_DECODERS[example.schema]
    decoded = decoder.decode(json.dumps(example.value).encode())
    assert isinstance(decoded, example.struct)
    _assert_preserved(example.value, decoded, example.schema)


@pytest.mark.parametrize("example", _params(ERROR_EXAMPLES))
def test_error_example_maps_to_the_right_error(example: Example) -> None:
    assert example.status is not None
    _validate(example.pointer, example.value)
    body = json.dumps(example.value).encode()
    error = error_from_response(example.status, {}, body)
    expected = ERROR_CLASSES.get(example.status)
    if expected is None:
        expected = InternalServerError if example.status >= 500 else APIStatusError
    assert type(error) is expected, f"{example.status} -> {type(error).__name__}"
    assert error.status == example.status
    assert error.body == body
    assert error.message == example.value["error"]["message"]
    assert example.value["error"]["message"] in str(error)
    assert error.ref_id == example.value["error"]["ref_id"]
    decoded = msgspec.json.decode(body, type=ErrorResponse)
    _assert_preserved(example.value, decoded, "ErrorResponse")
    assert decoded.error.message == example.value["error"]["message"]


@pytest.mark.parametrize("example", _params(REQUEST_EXAMPLES))
def test_request_example_decodes_into_run_input(example: Example) -> None:
    document = example.document
    _validate(CREATE_BODY_POINTER, document)
    decoded = RUN_INPUT_DECODER.decode(json.dumps(document).encode())
    _assert_preserved(document, decoded, "RunInput")


@pytest.mark.parametrize("example", _params(COMPONENT_EXAMPLES))
def test_component_example_decodes(example: Example) -> None:
    _validate(example.pointer, example.document)
    decoded = _decode(example)
    assert isinstance(decoded, example.struct)
    _assert_preserved(example.document, decoded, example.schema)


@pytest.mark.parametrize(
    "task_spec",
    [
        pytest.param(
            {"output_schema": {"json_schema": {"type": "object"}}},
            id="output-json-no-type",
        ),
        pytest.param(
            {"output_schema": {"description": "the answer"}},
            id="output-text-no-type",
        ),
        pytest.param(
            {"output_schema": "x", "input_schema": {"json_schema": {"type": "object"}}},
            id="input-json-no-type",
        ),
        pytest.param(
            {"output_schema": {"type": "json", "json_schema": {"type": "object"}}},
            id="output-json-typed",
        ),
    ],
)
def test_task_spec_schema_type_is_optional(task_spec: dict[str, Any]) -> None:
    document = {"input": "x", "processor": "base", "task_spec": task_spec}
    _validate(CREATE_BODY_POINTER, document)
    decoded = decode_run_input(200, json.dumps(document).encode())
    assert decoded.task_spec is not None


# --- 2. the bodies we encode validate against the spec --------------------------------------------

JSON_SCHEMA = {
    "type": "object",
    "properties": {"gdp": {"type": "string", "description": "GDP in USD"}},
    "required": ["gdp"],
    "additionalProperties": False,
}

CREATE_KWARGS: dict[str, dict[str, Any]] = {
    "minimal-string": {"input": "What was the GDP of France in 2023?", "processor": "base"},
    "object-input": {
        "input": {"country": "France", "year": 2023, "tags": [None, 1.5]},
        "processor": "core",
    },
    "json-task-spec": {
        "input": {"country": "France"},
        "processor": "core",
        "task_spec": TaskSpec(
            output_schema=JsonSchema(json_schema=JSON_SCHEMA),
            input_schema=JsonSchema(json_schema={"type": "object"}),
        ),
    },
    "json-task-spec-dict-untyped": {
        "input": "x",
        "processor": "base",
        "task_spec": {"output_schema": {"json_schema": JSON_SCHEMA}, "input_schema": "a country"},
    },
    "text-schema": {
        "input": "x",
        "processor": "base",
        "task_spec": TaskSpec(
            output_schema=TextSchema(description="a report"), input_schema=TextSchema()
        ),
    },
    "text-schema-dict-untyped": {
        "input": "x",
        "processor": "base",
        "task_spec": {"output_schema": {"description": "a report"}},
    },
    "bare-string-output": {"input": "x", "processor": "base", "task_spec": "one paragraph"},
    "auto-schema": {
        "input": "x",
        "processor": "pro",
        "task_spec": TaskSpec(output_schema=AutoSchema()),
    },
    "auto-schema-dict": {
        "input": "x",
        "processor": "pro",
        "task_spec": {"output_schema": {"type": "auto"}},
    },
    "metadata-scalars": {
        "input": "x",
        "processor": "base",
        "metadata": {
            "s": "v",
            "i": 7,
            "f": 2.5,
            "t": True,
            "b": False,
            "sixteen_chars_ok": "y" * 512,
        },
    },
    "source-policy": {
        "input": "x",
        "processor": "base",
        "source_policy": {
            "include_domains": ["wikipedia.org", ".edu"],
            "exclude_domains": ["reddit.com"],
            "after_date": "2024-01-01",
        },
    },
    "source-policy-struct": {
        "input": "x",
        "processor": "base",
        "source_policy": SourcePolicy(exclude_domains=["x.com"]),
    },
    "source-policy-empty": {"input": "x", "processor": "base", "source_policy": {}},
    "advanced-settings": {
        "input": "x",
        "processor": "base",
        "advanced_settings": {"location": "us"},
    },
    "advanced-settings-empty": {
        "input": "x",
        "processor": "base",
        "advanced_settings": TaskAdvancedSettings(),
    },
    "webhook-default-events": {
        "input": "x",
        "processor": "base",
        "webhook": {"url": "https://example.com/hook"},
    },
    "webhook-explicit": {
        "input": "x",
        "processor": "base",
        "webhook": Webhook(url="https://example.com/hook", event_types=["task_run.status"]),
    },
    "previous-interaction": {
        "input": "and in 2024?",
        "processor": "base",
        "previous_interaction_id": "trun_9907962f83aa4d9d98fd7f4bf745d654",
    },
    "enable-events-true": {"input": "x", "processor": "pro", "enable_events": True},
    "enable-events-false": {"input": "x", "processor": "pro", "enable_events": False},
    "memory-scope-key": {"input": "x", "processor": "base", "memory_scope_key": "team_a-1"},
    "everything": {
        "input": {"q": "x"},
        "processor": "ultra",
        "metadata": {"k": 1},
        "task_spec": {"output_schema": {"type": "json", "json_schema": JSON_SCHEMA}},
        "source_policy": {"include_domains": [".gov"]},
        "advanced_settings": {"location": "gb"},
        "previous_interaction_id": "trun_1",
        "enable_events": True,
        "webhook": {"url": "https://example.com/hook"},
        "memory_scope_key": "k",
    },
}


# Bodies with MCP servers (dicts, Structs, or a mix).
MCP_KWARGS: dict[str, dict[str, Any]] = {
    "mcp-servers-mixed": {
        "input": "x",
        "processor": "core",
        "mcp_servers": [
            {"name": "tools", "url": "https://mcp.example.com/sse"},
            McpServer(
                name="private",
                url="https://mcp.example.com/private",
                headers={"Authorization": "Bearer t"},
                allowed_tools=["search", "fetch"],
            ),
        ],
    },
    "mcp-servers-dicts": {
        "input": "x",
        "processor": "core",
        "mcp_servers": [{"name": "tools", "url": "https://mcp.example.com/sse"}],
    },
    "mcp-servers-empty": {"input": "x", "processor": "core", "mcp_servers": []},
}


def _check_encoded_body(body: RunInput) -> dict[str, Any]:
    raw = encode(body)
    document: dict[str, Any] = msgspec.json.decode(raw)
    _validate(CREATE_BODY_POINTER, document)
    assert RUN_INPUT_DECODER.decode(raw) == body, "the body does not decode back to itself"
    return document


@pytest.mark.parametrize(
    "kwargs",
    [pytest.param(v, id=k) for k, v in {**CREATE_KWARGS, **MCP_KWARGS}.items()],
)
def test_built_body_validates(kwargs: dict[str, Any]) -> None:
    document = _check_encoded_body(build_run_input(**kwargs))
    assert document["processor"] == kwargs["processor"]
    for key in ("enable_events", "previous_interaction_id", "memory_scope_key"):
        if key in kwargs:
            assert document[key] == kwargs[key]


_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,40}", fullmatch=True)
_URLS = st.builds("https://{}.example.com/{}".format, _IDS, _IDS)
_DOMAINS = st.lists(
    st.sampled_from(["wikipedia.org", ".edu", "usa.gov", "x.com", ".co.uk"]), max_size=4
)
_JSON_SCHEMAS = st.builds(
    lambda props: {
        "type": "object",
        "properties": {name: {"type": kind} for name, kind in props.items()},
        "required": sorted(props),
        "additionalProperties": False,
    },
    st.dictionaries(
        st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
        st.sampled_from(["string", "integer", "number", "boolean"]),
        min_size=1,
        max_size=4,
    ),
)
_TEXT_SCHEMAS = st.builds(TextSchema, description=st.none() | st.text(max_size=40))
_OUTPUT_SCHEMAS: st.SearchStrategy[object] = st.one_of(
    st.builds(JsonSchema, json_schema=_JSON_SCHEMAS),
    _TEXT_SCHEMAS,
    st.just(AutoSchema()),
    st.text(min_size=1, max_size=40),
    _JSON_SCHEMAS.map(lambda s: {"json_schema": s}),
    st.text(max_size=40).map(lambda d: {"description": d}),
    st.just({"type": "auto"}),
)
_INPUT_SCHEMAS: st.SearchStrategy[object] = st.one_of(
    st.none(),
    st.builds(JsonSchema, json_schema=_JSON_SCHEMAS),
    _TEXT_SCHEMAS,
    st.text(min_size=1, max_size=40),
)
_TASK_SPECS: st.SearchStrategy[object] = st.one_of(
    st.none(),
    st.text(min_size=1, max_size=40),
    st.builds(
        lambda o, i: {"output_schema": o, "input_schema": i}, _OUTPUT_SCHEMAS, _INPUT_SCHEMAS
    ),
)
_METADATA = st.none() | st.dictionaries(
    st.text(min_size=1, max_size=16),
    st.text(max_size=40)
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans(),
    max_size=5,
)
_SOURCE_POLICIES = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "include_domains": _DOMAINS,
        "exclude_domains": _DOMAINS,
        "after_date": st.none() | st.dates(date(1990, 1, 1), date(2100, 1, 1)).map(date.isoformat),
    },
)
_MCP_SERVERS = st.lists(
    st.fixed_dictionaries(
        {"name": _IDS, "url": _URLS},
        optional={
            "headers": st.none()
            | st.dictionaries(st.sampled_from(["Authorization", "X-Key"]), st.text(max_size=20)),
            "allowed_tools": st.none() | st.lists(_IDS, max_size=3),
        },
    ),
    max_size=3,
)
_CREATE_KWARGS = st.fixed_dictionaries(
    {
        "input": st.text(min_size=1, max_size=60)
        | st.dictionaries(st.text(max_size=8), _JSON, max_size=4),
        "processor": st.sampled_from(["lite", "base", "core", "pro", "ultra", "core-fast"]),
    },
    optional={
        "metadata": _METADATA,
        "task_spec": _TASK_SPECS,
        "source_policy": _SOURCE_POLICIES,
        "advanced_settings": st.none()
        | st.fixed_dictionaries(
            {}, optional={"location": st.none() | st.sampled_from(["us", "gb", "de", "jp"])}
        ),
        "previous_interaction_id": st.none() | _IDS,
        "mcp_servers": st.none(),  # non-empty lists: test_random_bodies_with_mcp_servers
        "enable_events": st.none() | st.booleans(),
        "webhook": st.none()
        | st.fixed_dictionaries(
            {"url": _URLS}, optional={"event_types": st.just(["task_run.status"])}
        ),
        "memory_scope_key": st.none() | _IDS,
    },
)


@settings(max_examples=200, deadline=None)
@given(kwargs=_CREATE_KWARGS)
def test_random_built_bodies_validate(kwargs: dict[str, Any]) -> None:
    _check_encoded_body(build_run_input(**kwargs))


@settings(max_examples=50, deadline=None)
@given(kwargs=_CREATE_KWARGS, mcp_servers=_MCP_SERVERS)
def test_random_bodies_with_mcp_servers_validate(
    kwargs: dict[str, Any], mcp_servers: list[dict[str, Any]]
) -> None:
    _check_encoded_body(build_run_input(**{**kwargs, "mcp_servers": mcp_servers}))


# --- 3. decoded examples re-encode to spec-valid JSON --------------------------------------------


def _round_trip_params() -> list[Any]:
    params: list[Any] = []
    for example in ALL_EXAMPLES:
        try:
            decoded = _decode(example)
            dropped = _dropped_required(decoded, msgspec.json.decode(encode(decoded)))
        except msgspec.ValidationError:
            dropped = []  # test_*_decodes reports it; the round trip then fails too
        unknown = [d for d in dropped if d[:2] not in DROPPED_REQUIRED]
        marks = []
        if dropped and not unknown:
            reason = "; ".join(
                f"at {where}: {DROPPED_REQUIRED[schema, prop]}" for schema, prop, where in dropped
            )
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        params.append(pytest.param(example, id=example.id, marks=marks))
    return params


@pytest.mark.parametrize("example", _round_trip_params())
def test_decoded_example_re_encodes_to_valid_json(example: Example) -> None:
    decoded = _decode(example)
    raw = encode(decoded)
    _validate(example.pointer, msgspec.json.decode(raw))
    assert msgspec.json.decode(raw, type=example.struct) == decoded

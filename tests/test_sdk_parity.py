"""Drop-in attribute parity with the official SDK (``parallel-web``, imported as ``parallel``).

Code written against the SDK reads ``result.output.type``, ``run.task_group_id`` and
``err.status_code``; the same attribute reads must work on our types.
"""

from __future__ import annotations

import inspect
import json
from types import ModuleType
from typing import Any

import msgspec
import parallel.types
import parallel.types.shared
import pytest
from spec_contract import SPEC_PATH

import parallel_async
from parallel_async import (
    AutoSchema,
    JsonSchema,
    TaskRun,
    TaskRunJsonOutput,
    TaskRunResult,
    TaskRunTextOutput,
    TaskSpec,
    TextSchema,
    _events,
    _models,
)

# SDK attributes our types do not have yet, in files this change did not touch.
KNOWN_GAPS: dict[str, set[str]] = {
    "TaskGroup": {"task_group_id"},  # _events.TaskGroup has only the wire name taskgroup_id
    "TaskAdvancedSettings": {"data_sources"},  # an SDK-only setting, not in our spec version
}


def _tagged_structs(*modules: ModuleType) -> list[type[msgspec.Struct]]:
    found = []
    for module in modules:
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, msgspec.Struct)
                and value.__module__ == module.__name__
                and value.__struct_config__.tag_field is not None
            ):
                found.append(value)
    return found


TAGGED = _tagged_structs(_models, _events)


def test_the_tagged_structs_were_found() -> None:
    names = {t.__name__ for t in TAGGED}
    assert {"JsonSchema", "TextSchema", "AutoSchema", "TaskRunJsonOutput"} <= names
    assert {"TaskRunTextOutput", "TaskRunStateEvent", "ErrorEvent"} <= names


@pytest.mark.parametrize("struct", TAGGED, ids=lambda t: t.__name__)
def test_every_tagged_struct_has_a_read_only_type_property(struct: type[msgspec.Struct]) -> None:
    config = struct.__struct_config__
    assert config.tag_field == "type"
    attr = inspect.getattr_static(struct, "type")
    assert isinstance(attr, property), f"{struct.__name__}.type is not a property"
    assert attr.fset is None
    assert "type" not in struct.__struct_fields__  # the tag stays msgspec's, not a field
    assert attr.fget is not None


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        (JsonSchema(json_schema={"type": "object", "properties": {}}), "json"),
        (TextSchema(description="a report"), "text"),
        (TextSchema(), "text"),
        (AutoSchema(), "auto"),
        (TaskRunJsonOutput(content={"a": 1}), "json"),
        (TaskRunTextOutput(content="report"), "text"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, msgspec.Struct) else str(v),
)
def test_type_reads_the_tag_and_round_trips(value: msgspec.Struct, tag: str) -> None:
    assert value.type == tag  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        value.type = "other"  # type: ignore[attr-defined]
    raw = msgspec.json.encode(value)
    pairs = json.loads(raw, object_pairs_hook=lambda kv: kv)
    assert [k for k, _ in pairs].count("type") == 1  # encoded once, from the tag
    assert dict(pairs)["type"] == tag
    again = msgspec.json.decode(raw, type=type(value))
    assert again == value
    assert again.type == tag  # type: ignore[attr-defined]


def test_output_type_after_decoding_a_result_from_the_wire() -> None:
    run = {"run_id": "trun_1", "status": "completed", "is_active": False, "processor": "base"}
    for output, tag in [
        ({"type": "json", "content": {"ceo": "Ada"}, "basis": []}, "json"),
        ({"type": "text", "content": "# Report", "basis": []}, "text"),
    ]:
        body = msgspec.json.encode({"run": run, "output": output})
        result = msgspec.json.decode(body, type=TaskRunResult)
        assert result.output.type == tag
        assert msgspec.json.decode(msgspec.json.encode(result), type=TaskRunResult) == result


def test_schemas_in_a_task_spec_keep_their_type_through_encoding() -> None:
    spec = TaskSpec(output_schema=JsonSchema(json_schema={"type": "object"}), input_schema="x")
    again = msgspec.json.decode(msgspec.json.encode(spec), type=TaskSpec)
    assert isinstance(again.output_schema, JsonSchema)
    assert again.output_schema.type == "json"
    assert msgspec.json.decode(msgspec.json.encode(spec)) == {
        "output_schema": {"type": "json", "json_schema": {"type": "object"}},
        "input_schema": "x",
    }


def test_task_group_id_reads_the_wire_field_taskgroup_id() -> None:
    if SPEC_PATH.is_file():
        props = json.loads(SPEC_PATH.read_text(encoding="utf-8"))["components"]["schemas"][
            "TaskRun"
        ]["properties"]
        assert "taskgroup_id" in props
        assert "task_group_id" not in props
    body = (
        b'{"run_id": "trun_1", "status": "running", "is_active": true, "processor": "base",'
        b' "taskgroup_id": "tgrp_1"}'
    )
    run = msgspec.json.decode(body, type=TaskRun)
    assert run.taskgroup_id == run.task_group_id == "tgrp_1"
    encoded = msgspec.json.decode(msgspec.json.encode(run))
    assert encoded["taskgroup_id"] == "tgrp_1"
    assert "task_group_id" not in encoded
    with pytest.raises(AttributeError):
        run.task_group_id = "tgrp_2"  # type: ignore[misc]
    assert (
        TaskRun(run_id="r", status="queued", is_active=True, processor="base").task_group_id is None
    )


def _sdk_model(name: str) -> Any:
    for module in (parallel.types, parallel.types.shared):
        model = getattr(module, name, None)
        if model is not None and hasattr(model, "model_fields"):
            return model
    return None


SHARED_NAMES = sorted(name for name in parallel_async.__all__ if _sdk_model(name) is not None)


def test_enough_shared_names() -> None:
    assert {"TaskRun", "TaskRunJsonOutput", "TaskRunTextOutput", "JsonSchema"} <= set(SHARED_NAMES)


@pytest.mark.parametrize("name", SHARED_NAMES)
def test_every_sdk_attribute_reads_on_our_type(name: str) -> None:
    ours = getattr(parallel_async, name)
    sdk_fields = set(_sdk_model(name).model_fields)
    missing = {field for field in sdk_fields if not hasattr(ours, field)}
    assert missing <= KNOWN_GAPS.get(name, set()), f"{name} lacks the SDK's {sorted(missing)}"

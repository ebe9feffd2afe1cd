"""Tests of the fake Parallel server, over real HTTP on 127.0.0.1.

Time is driven by run durations, ``fake.complete``/``fail``/``cancel`` and the
``max_long_poll`` cap; waits are on observable conditions, never on fixed sleeps.
Every JSON body is checked against the official OpenAPI document when it is present.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import anyio
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_contract import SPEC_PATH, check_contract, spec_registry

from parallel_async.testing import FakeParallel, FakeServer, Fault, RunPlan, run_fake_server
from parallel_async.testing._outputs import build_output
from parallel_async.testing._ratelimit import SlidingWindow
from parallel_async.testing._validation import PROCESSORS

pytest_plugins = ["parallel_async.testing.pytest_plugin"]
pytestmark = pytest.mark.anyio

API_KEY = "test-key"
RUNS = "/v1/tasks/runs"
RUN = "/v1/tasks/runs/{run_id}"
RUN_INPUT = "/v1/tasks/runs/{run_id}/input"
RUN_RESULT = "/v1/tasks/runs/{run_id}/result"
RUN_ID = re.compile(r"trun_[0-9a-f]{32}")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}")

# A schema exercising every construct the output generator supports.
RICH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "Company name"},
        "founded": {"type": "integer"},
        "revenue": {"type": "number"},
        "public": {"type": "boolean"},
        "sector": {"type": "string", "enum": ["tech", "finance"]},
        "kind": {"const": "company"},
        "ceo": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/person"}]},
        "board": {"type": "array", "items": {"$ref": "#/definitions/person"}},
        "tags": {"type": ["array", "null"], "items": {"type": "string"}},
        "rating": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
        "hq": {"allOf": [{"$ref": "#/$defs/place"}, {"required": ["country"]}]},
        "nothing": {"type": "null"},
        "parent": {"$ref": "#/$defs/org"},
    },
    "required": ["name", "founded", "revenue", "public", "sector", "kind", "ceo", "board"],
    "additionalProperties": False,
    "$defs": {
        "person": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        "place": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        },
        # Recursive: generation must stop by itself.
        "org": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "parent": {"anyOf": [{"$ref": "#/$defs/org"}, {"type": "null"}]},
                "children": {"type": "array", "items": {"$ref": "#/$defs/org"}},
            },
            "required": ["name", "parent", "children"],
        },
    },
    "definitions": {
        "person": {
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
        }
    },
}


# --- a small client over aiohttp -------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    raw: bytes

    @property
    def body(self) -> Any:
        return json.loads(self.raw)

    @property
    def error(self) -> dict[str, Any]:
        body = self.body
        assert body["type"] == "error", body
        assert UUID.fullmatch(body["error"]["ref_id"]), body
        error: dict[str, Any] = body["error"]
        return error


@dataclass
class Api:
    fake: FakeParallel
    server: FakeServer
    session: aiohttp.ClientSession

    async def call(
        self,
        method: str,
        template: str,
        run_id: str = "",
        *,
        key: str | None = API_KEY,
        validate: bool = True,
        **kwargs: Any,
    ) -> Reply:
        headers = {} if key is None else {"x-api-key": key}
        url = self.server.url + template.format(run_id=run_id)
        async with self.session.request(method, url, headers=headers, **kwargs) as response:
            reply = Reply(response.status, response.headers, await response.read())
        if validate:
            check_contract(method, template, reply.status, reply.body)
        return reply

    async def create(self, body: object, **kwargs: Any) -> Reply:
        return await self.call("POST", RUNS, json=body, **kwargs)

    async def retrieve(self, run_id: str, **kwargs: Any) -> Reply:
        return await self.call("GET", RUN, run_id, **kwargs)

    async def input(self, run_id: str, **kwargs: Any) -> Reply:
        return await self.call("GET", RUN_INPUT, run_id, **kwargs)

    async def result(self, run_id: str, timeout: object = None, **kwargs: Any) -> Reply:
        params = {} if timeout is None else {"timeout": str(timeout)}
        return await self.call("GET", RUN_RESULT, run_id, params=params, **kwargs)

    async def new_run(self, **fields: Any) -> str:
        reply = await self.create(
            {"input": "What is the GDP of France?", "processor": "core", **fields}
        )
        assert reply.status == 202, reply.raw
        run_id: str = reply.body["run_id"]
        return run_id


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[Api]:
    """A FakeParallel (``max_long_poll`` 0.05 s unless given) served on a free port."""
    options.setdefault("max_long_poll", 0.05)
    fake = FakeParallel(**options)
    try:
        async with FakeServer(fake) as server, aiohttp.ClientSession() as session:
            yield Api(fake, server, session)
    finally:
        fake.close()


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds (it depends on the server observing an event)."""
    with anyio.fail_after(timeout):
        # Polling is right here: the server exposes counters, not events.
        while not condition():
            await asyncio.sleep(0.001)


def _wall(timestamp: str) -> float:
    return datetime.strptime(timestamp.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


# --- create ----------------------------------------------------------------------------


async def test_create_answers_202_with_a_queued_run() -> None:
    async with serving() as api:
        reply = await api.create(
            {"input": {"country": "France"}, "processor": "core", "metadata": {"k": "v", "n": 1}}
        )
        assert reply.status == 202
        run = reply.body
        assert RUN_ID.fullmatch(run["run_id"])
        assert run["interaction_id"] == run["run_id"]
        assert run["status"] == "queued"
        assert run["is_active"] is True
        assert run["processor"] == "core"
        assert run["metadata"] == {"k": "v", "n": 1}
        assert run["taskgroup_id"] is None
        assert run["warnings"] is None
        assert run["error"] is None
        assert TIMESTAMP.fullmatch(run["created_at"])
        assert run["modified_at"] == run["created_at"]
        assert reply.headers["Content-Type"] == "application/json"
        assert api.fake.stats.runs_created == 1
        assert api.fake.runs[run["run_id"]].input["input"] == {"country": "France"}


async def test_every_documented_processor_is_accepted() -> None:
    async with serving() as api:
        for processor in sorted(PROCESSORS):
            reply = await api.create({"input": "q", "processor": processor})
            assert reply.status == 202, processor
        assert len(PROCESSORS) == 18


async def test_unknown_processor_is_403() -> None:
    async with serving() as api:
        reply = await api.create({"input": "q", "processor": "turbo"})
        assert reply.status == 403
        assert reply.error["message"] == "Forbidden: invalid processor in request"
        assert api.fake.stats.runs_created == 0


_MISSING = object()
_SCHEMA_ROOT_ARRAY = {"type": "json", "json_schema": {"type": "array", "items": {}}}


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        pytest.param([1, 2], ["body"], id="not-an-object"),
        pytest.param({"input": _MISSING}, ["body", "input"], id="missing-input"),
        pytest.param({"processor": _MISSING}, ["body", "processor"], id="missing-processor"),
        pytest.param({"input": 3, "processor": "core"}, ["body", "input"], id="input-type"),
        pytest.param({"input": "q", "processor": 1}, ["body", "processor"], id="processor-type"),
        pytest.param({"metadata": [1]}, ["body", "metadata"], id="metadata-type"),
        pytest.param({"metadata": {"k": [1]}}, ["body", "metadata", "k"], id="metadata-value"),
        pytest.param({"enable_events": "yes"}, ["body", "enable_events"], id="enable-events"),
        pytest.param(
            {"previous_interaction_id": 5}, ["body", "previous_interaction_id"], id="prev"
        ),
        pytest.param({"task_spec": "x"}, ["body", "task_spec"], id="task-spec-type"),
        pytest.param({"task_spec": {}}, ["body", "task_spec", "output_schema"], id="no-output"),
        pytest.param(
            {"task_spec": {"output_schema": _SCHEMA_ROOT_ARRAY}},
            ["body", "task_spec", "output_schema", "json_schema"],
            id="json-root-not-object",
        ),
        pytest.param(
            {"task_spec": {"output_schema": {"type": "json", "json_schema": {"type": "object"}}}},
            ["body", "task_spec", "output_schema", "json_schema"],
            id="json-root-without-properties",
        ),
        pytest.param(
            {"task_spec": {"output_schema": {"type": "json"}}},
            ["body", "task_spec", "output_schema", "json_schema"],
            id="json-schema-missing",
        ),
        pytest.param(
            {"task_spec": {"output_schema": {"type": "xml"}}},
            ["body", "task_spec", "output_schema", "type"],
            id="output-schema-type",
        ),
        pytest.param(
            {"task_spec": {"output_schema": "text", "input_schema": {"type": "auto"}}},
            ["body", "task_spec", "input_schema", "type"],
            id="input-schema-auto",
        ),
        pytest.param(
            {"source_policy": {"include_domains": "a.com"}},
            ["body", "source_policy", "include_domains"],
            id="include-domains",
        ),
        pytest.param(
            {"source_policy": {"after_date": "yesterday"}},
            ["body", "source_policy", "after_date"],
            id="after-date",
        ),
        pytest.param(
            {"advanced_settings": {"location": 1}},
            ["body", "advanced_settings", "location"],
            id="location",
        ),
        pytest.param(
            {"mcp_servers": [{"name": "m"}]}, ["body", "mcp_servers", 0, "url"], id="mcp-url"
        ),
        pytest.param({"webhook": {"event_types": []}}, ["body", "webhook", "url"], id="webhook"),
        pytest.param({"memory_scope_key": "a b"}, ["body", "memory_scope_key"], id="memory-key"),
    ],
)
async def test_invalid_create_bodies_are_422_naming_the_field(body: Any, loc: list[Any]) -> None:
    if isinstance(body, dict):
        merged = {"input": "q", "processor": "core", **body}
        body = {key: value for key, value in merged.items() if value is not _MISSING}
    async with serving() as api:
        reply = await api.create(body)
        assert reply.status == 422, reply.raw
        assert reply.error["message"] == "Unprocessable content: request validation error"
        assert loc in [error["loc"] for error in reply.error["detail"]["errors"]]
        assert api.fake.stats.runs_created == 0


async def test_body_that_is_not_json_is_422() -> None:
    async with serving() as api:
        reply = await api.call("POST", RUNS, data=b"{not json")
        assert reply.status == 422
        assert reply.error["detail"]["errors"][0]["loc"] == ["body"]


async def test_metadata_limits() -> None:
    async with serving() as api:
        too_long_key = await api.create(
            {"input": "q", "processor": "core", "metadata": {"k" * 17: "v"}}
        )
        assert too_long_key.status == 422
        assert too_long_key.error["detail"]["errors"][0]["loc"] == ["body", "metadata", "k" * 17]
        too_long_value = await api.create(
            {"input": "q", "processor": "core", "metadata": {"k": "v" * 513}}
        )
        assert too_long_value.status == 422
        at_limits = {"k" * 16: "v" * 512, "n": 1.5, "flag": True}
        assert (await api.new_run(metadata=at_limits)) in api.fake.runs


async def test_schema_forms_are_accepted() -> None:
    async with serving() as api:
        for spec in (
            {"output_schema": "A one-paragraph summary"},
            {"output_schema": {"type": "text", "description": "Summary"}},
            {"output_schema": {"type": "auto"}},
            {"output_schema": {"json_schema": RICH_SCHEMA}},
            {"output_schema": {"type": "json", "json_schema": RICH_SCHEMA}, "input_schema": "A"},
            {
                "output_schema": {"type": "text"},
                "input_schema": {"type": "json", "json_schema": {"type": "string"}},
            },
        ):
            await api.new_run(task_spec=spec)


# --- auth --------------------------------------------------------------------------------


async def test_missing_or_wrong_key_is_401_on_every_endpoint() -> None:
    async with serving() as api:
        run_id = await api.new_run()
        for key in (None, "wrong-key"):
            for reply in (
                await api.create({"input": "q", "processor": "core"}, key=key),
                await api.retrieve(run_id, key=key),
                await api.input(run_id, key=key),
                await api.result(run_id, key=key),
            ):
                assert reply.status == 401
                assert reply.error["message"] == "Unauthorized: invalid or missing credentials"
                assert isinstance(reply.error["detail"], dict)
        assert api.fake.stats.statuses[401] == 8
        assert api.fake.stats.runs_created == 1


async def test_api_key_none_accepts_any_key_but_requires_one() -> None:
    async with serving(api_key=None) as api:
        assert (await api.create({"input": "q", "processor": "lite"}, key="anything")).status == 202
        assert (await api.create({"input": "q", "processor": "lite"}, key=None)).status == 401


# --- lifecycle ---------------------------------------------------------------------------


async def test_manual_lifecycle_queued_running_completed() -> None:
    async with serving(manual=True) as api:
        run_id = await api.new_run()
        created = api.fake.runs[run_id].created_at
        running = (await api.retrieve(run_id)).body
        assert running["status"] == "running"
        assert running["is_active"] is True
        api.fake.complete(run_id)
        done = (await api.retrieve(run_id)).body
        assert done["status"] == "completed"
        assert done["is_active"] is False
        assert done["error"] is None
        record = api.fake.runs[run_id]
        assert record.completed_at is not None
        assert record.completed_at >= created
        # modified_at on the wire is the real completion time.
        assert abs(_wall(done["modified_at"]) - record.completed_at) < 1e-5
        with pytest.raises(ValueError, match="already completed"):
            api.fake.complete(run_id)
        with pytest.raises(KeyError):
            api.fake.fail("trun_" + "0" * 32)


async def test_timed_runs_complete_after_their_duration() -> None:
    async with serving(duration=0.05, max_long_poll=None) as api:
        run_id = await api.new_run()
        reply = await api.result(run_id, timeout=5)
        assert reply.status == 200
        record = api.fake.runs[run_id]
        assert record.completed_at is not None
        assert record.completed_at - record.created_at >= 0.04
        assert reply.body["run"]["modified_at"] != reply.body["run"]["created_at"]


async def test_processor_durations_override_the_default() -> None:
    async with serving(duration=0.0, processor_durations={"ultra": math.inf}) as api:
        slow = await api.new_run(processor="ultra")
        fast = await api.new_run(processor="lite")
        assert (await api.result(fast, timeout=5)).status == 200
        assert (await api.result(slow, timeout=5)).status == 408
        assert api.fake.runs[slow].is_active


async def test_plan_callback_chooses_outcome_and_content() -> None:
    def plan(body: dict[str, Any]) -> RunPlan | None:
        if body["input"] == "fail":
            return RunPlan(outcome="failed", error_message="no sources found")
        if body["input"] == "cancel":
            return RunPlan(outcome="cancelled")
        if body["input"] == "text":
            return RunPlan(content="# Hand-written report")
        if body["input"] == "json":
            return RunPlan(duration=0.0, content={"answer": 42})
        if body["input"] == "hold":
            return RunPlan(duration=math.inf)
        if body["input"] == "manual":
            return RunPlan(duration=None)
        return None

    async with serving(plan=plan, max_long_poll=None) as api:
        failed = await api.new_run(input="fail")
        assert (await api.result(failed, timeout=5)).status == 404
        error = (await api.retrieve(failed)).body["error"]
        assert error["message"] == "no sources found"
        assert UUID.fullmatch(error["ref_id"])
        cancelled = await api.new_run(input="cancel")
        assert (await api.result(cancelled, timeout=5)).status == 404
        assert (await api.retrieve(cancelled)).body["status"] == "cancelled"
        text = await api.new_run(input="text")
        output = (await api.result(text, timeout=5)).body["output"]
        assert output["type"] == "text"
        assert output["content"] == "# Hand-written report"
        json_run = await api.new_run(input="json")
        assert (await api.result(json_run, timeout=5)).body["output"]["content"] == {"answer": 42}
        for held in (await api.new_run(input="hold"), await api.new_run(input="manual")):
            assert (await api.result(held, timeout=0)).status == 408
            api.fake.complete(held)
            assert (await api.result(held, timeout=0)).status == 200


async def test_settings_can_change_between_runs() -> None:
    async with serving() as api:
        api.fake.manual = True
        held = await api.new_run()
        # An explicit plan duration still schedules a run in manual mode.
        api.fake.plan = lambda body: RunPlan(duration=0.0) if body["input"] == "go" else None
        scheduled = await api.new_run(input="go")
        assert (await api.result(scheduled, timeout=5)).status == 200
        assert (await api.result(held, timeout=0)).status == 408
        api.fake.manual = False
        api.fake.processor_durations = {"lite": math.inf}
        assert (await api.result(await api.new_run(processor="lite"), timeout=0)).status == 408
        api.fake.duration = 0.01
        api.fake.plan = None
        assert (await api.result(await api.new_run(), timeout=5)).status == 200
        assert RunPlan().duration is not None
        assert repr(RunPlan().duration) == "<use default>"


def test_run_plan_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="outcome"):
        RunPlan(outcome="exploded")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duration"):
        RunPlan(duration=-1)
    with pytest.raises(TypeError, match="content"):
        RunPlan(content=[1, 2])


# --- /result -----------------------------------------------------------------------------


async def test_result_long_poll_times_out_with_408_then_answers_200() -> None:
    async with serving(manual=True) as api:
        run_id = await api.new_run()
        timed_out = await api.result(run_id, timeout=600)  # capped by max_long_poll
        assert timed_out.status == 408
        assert timed_out.error["message"] == "Request timed out; run still active"
        assert api.fake.stats.max_result_in_flight == 1
        api.fake.complete(run_id)
        done = await api.result(run_id)
        assert done.status == 200
        assert done.body["run"]["status"] == "completed"


async def test_held_result_wakes_as_soon_as_the_run_completes() -> None:
    async with serving(manual=True, max_long_poll=None) as api:
        run_id = await api.new_run()
        waiting = asyncio.ensure_future(api.result(run_id, timeout=30))
        await eventually(lambda: api.fake.stats.result_in_flight == 1)
        api.fake.complete(run_id, content={"gdp": "$3.1 trillion"})
        reply = await asyncio.wait_for(waiting, 5)
        assert reply.status == 200
        assert reply.body["output"]["content"] == {"gdp": "$3.1 trillion"}
        assert api.fake.stats.result_in_flight == 0


async def test_held_result_gets_404_when_the_run_fails() -> None:
    async with serving(manual=True, max_long_poll=None) as api:
        run_id = await api.new_run()
        waiting = asyncio.ensure_future(api.result(run_id, timeout=30))
        await eventually(lambda: api.fake.stats.result_in_flight == 1)
        api.fake.fail(run_id, message="upstream exploded")
        reply = await asyncio.wait_for(waiting, 5)
        assert reply.status == 404
        assert reply.error["message"] == "Run failed or run id not found"
        assert reply.error["detail"]["error"]["message"] == "upstream exploded"


async def test_timeout_zero_answers_at_once_without_holding() -> None:
    async with serving(manual=True, max_long_poll=None) as api:
        run_id = await api.new_run()
        assert (await api.result(run_id, timeout=0)).status == 408
        assert (await api.result(run_id, timeout=-5)).status == 408
        assert api.fake.stats.max_result_in_flight == 0


@pytest.mark.parametrize("timeout", ["abc", "1.5", "", "1e3"])
async def test_non_integer_timeout_is_422(timeout: str) -> None:
    async with serving() as api:
        reply = await api.result(await api.new_run(), timeout=timeout)
        assert reply.status == 422
        assert reply.error["detail"]["errors"][0]["loc"] == ["query", "timeout"]


async def test_failed_cancelled_and_unknown_runs_are_404() -> None:
    async with serving(manual=True) as api:
        failed, cancelled = await api.new_run(), await api.new_run()
        api.fake.fail(failed, message="boom")
        api.fake.cancel(cancelled)
        for run_id in (failed, cancelled, "trun_" + "f" * 32):
            reply = await api.result(run_id)
            assert reply.status == 404
            assert reply.error["message"] == "Run failed or run id not found"
        run = (await api.retrieve(failed)).body
        assert run["status"] == "failed"
        assert run["is_active"] is False
        assert run["error"]["message"] == "boom"
        assert set(run["error"]) == {"ref_id", "message", "detail"}
        assert (await api.retrieve(cancelled)).body["is_active"] is False
        for call in (api.retrieve, api.input):
            unknown = await call("trun_" + "f" * 32)
            assert unknown.status == 404
            assert unknown.error["message"] == "Run id not found"


async def test_action_required_is_held_like_an_active_run() -> None:
    async with serving(manual=True) as api:
        run_id = await api.new_run()
        api.fake.require_action(run_id)
        run = (await api.retrieve(run_id)).body
        assert run["status"] == "action_required"
        assert run["is_active"] is False
        assert (await api.result(run_id)).status == 408
        api.fake.complete(run_id)
        assert (await api.result(run_id)).status == 200


# --- /input and outputs --------------------------------------------------------------------


async def test_input_returns_the_stored_request() -> None:
    body = {
        "input": {"country": "France", "year": 2023},
        "processor": "pro-fast",
        "metadata": {"batch": "b1"},
        "task_spec": {"output_schema": {"type": "json", "json_schema": RICH_SCHEMA}},
        "source_policy": {"include_domains": [".gov"], "after_date": "2024-01-01"},
        "enable_events": False,
    }
    async with serving() as api:
        reply = await api.create(body)
        stored = await api.input(reply.body["run_id"])
        assert stored.status == 200
        assert stored.body == body


async def test_json_output_validates_against_the_runs_schema() -> None:
    async with serving() as api:
        run_id = await api.new_run(
            task_spec={"output_schema": {"type": "json", "json_schema": RICH_SCHEMA}}
        )
        first = await api.result(run_id, timeout=5)
        output = first.body["output"]
        assert output["type"] == "json"
        jsonschema.validate(output["content"], RICH_SCHEMA)
        assert set(RICH_SCHEMA["properties"]) <= set(output["content"])
        assert [b["field"] for b in output["basis"]] == list(output["content"])
        for basis in output["basis"]:
            assert basis["reasoning"]
            assert basis["confidence"] in {"low", "medium", "high"}
            assert basis["citations"][0]["url"].startswith("https://")
        assert output["output_schema"] is None
        assert (await api.result(run_id)).raw == first.raw


async def test_text_and_auto_outputs() -> None:
    async with serving() as api:
        text_run = await api.new_run(task_spec={"output_schema": "A short market summary"})
        text = (await api.result(text_run)).body["output"]
        assert text["type"] == "text"
        assert isinstance(text["content"], str)
        assert text["content"].startswith("#")
        assert [b["field"] for b in text["basis"]] == ["output"]
        for auto_run in (
            await api.new_run(),
            await api.new_run(task_spec={"output_schema": {"type": "auto"}}),
        ):
            auto = (await api.result(auto_run)).body["output"]
            assert auto["type"] == "json"
            assert isinstance(auto["output_schema"], dict)
            jsonschema.validate(auto["content"], auto["output_schema"])


def test_generated_output_is_deterministic_per_run() -> None:
    task = {
        "input": "q",
        "processor": "core",
        "task_spec": {"output_schema": {"json_schema": RICH_SCHEMA}},
    }
    run = "trun_" + "a" * 32
    assert build_output(task, run) == build_output(task, run)
    assert build_output(task, run) != build_output(task, "trun_" + "b" * 32)


_LEAVES = st.sampled_from(
    [
        {"type": "string"},
        {"type": "integer", "minimum": 3},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "string", "enum": ["x", "y"]},
        {"type": ["integer", "null"]},
        {"type": "string", "maxLength": 4},
    ]
)


def _compound(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    names = st.text("abcdefgh", min_size=1, max_size=5)
    objects = st.dictionaries(names, children, min_size=1, max_size=4).map(
        lambda props: {
            "type": "object",
            "properties": props,
            "required": sorted(props),
            "additionalProperties": False,
        }
    )
    arrays = children.map(lambda item: {"type": "array", "items": item})
    unions = st.lists(children, min_size=1, max_size=3).map(
        lambda branches: {"anyOf": [*branches, {"type": "null"}]}
    )
    return objects | arrays | unions


@settings(max_examples=40, deadline=None, database=None)
@given(
    st.dictionaries(
        st.text("xyz", min_size=1, max_size=4),
        st.recursive(_LEAVES, _compound, max_leaves=12),
        min_size=1,
    )
)
def test_generated_json_content_matches_arbitrary_schemas(properties: dict[str, Any]) -> None:
    schema = {"type": "object", "properties": properties, "required": sorted(properties)}
    task = {
        "input": "q",
        "processor": "core",
        "task_spec": {"output_schema": {"json_schema": schema}},
    }
    output = build_output(task, "trun_" + "c" * 32)
    jsonschema.validate(output["content"], schema)


# --- rate limit --------------------------------------------------------------------------


async def test_create_rate_limit_answers_429_with_retry_after() -> None:
    async with serving(create_rate_limit=(2, 60)) as api:
        run_id = await api.new_run()
        await api.new_run()
        limited = await api.create({"input": "q", "processor": "core"})
        assert limited.status == 429
        assert limited.error["message"] == "Too many requests: quota temporarily exceeded"
        # when the first create leaves the window, rounded up: 60 unless this took over 1 s
        # (the exact rounding is checked with a fake clock below)
        assert 55 <= int(limited.headers["Retry-After"]) <= 60
        # Reads do not count against the create quota.
        assert (await api.retrieve(run_id)).status == 200
        assert api.fake.stats.rate_limited == 1
        assert api.fake.stats.statuses[429] == 1
        assert api.fake.stats.runs_created == 2


def test_sliding_window_frees_slots_as_events_age_out() -> None:
    now = [100.0]
    window = SlidingWindow(2, 10.0, clock=lambda: now[0])
    assert window.acquire() is None
    now[0] = 104.0
    assert window.acquire() is None
    assert window.acquire() == 6  # the first event leaves the window at 110
    now[0] = 109.5
    assert window.acquire() == 1  # rounded up, never 0
    now[0] = 110.0
    assert window.acquire() is None
    assert window.acquire() == 4
    with pytest.raises(ValueError, match="create_rate_limit"):
        SlidingWindow(0, 1.0)


# --- faults ------------------------------------------------------------------------------


async def test_status_faults_are_answered_before_processing() -> None:
    async with serving() as api:
        api.fake.faults.script(
            "create",
            [
                Fault.status(429, retry_after="2"),
                Fault.status(503, retry_after_ms=150, headers={"x-should-retry": "true"}),
                Fault.ok(),
            ],
        )
        body = {"input": "q", "processor": "core"}
        first = await api.create(body)
        assert first.status == 429
        assert first.headers["Retry-After"] == "2"
        second = await api.create(body)
        assert second.status == 503
        assert second.headers["retry-after-ms"] == "150"
        assert second.headers["x-should-retry"] == "true"
        assert second.error["message"] == "Service unavailable"
        assert (await api.create(body)).status == 202
        assert (await api.create(body)).status == 202  # script exhausted
        assert api.fake.stats.runs_created == 2
        assert api.fake.stats.rate_limited == 1
        assert api.fake.faults.remaining("create") == 0


async def test_drop_closes_the_connection_before_processing() -> None:
    async with serving() as api:
        api.fake.faults.script("create", [Fault.drop()])
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await api.create({"input": "q", "processor": "core"})
        assert api.fake.stats.runs_created == 0
        assert api.fake.stats.dropped == 1
        assert sum(api.fake.stats.statuses.values()) == 0


async def test_drop_sends_no_bytes_at_all() -> None:
    async with serving() as api:
        api.fake.faults.script("retrieve", [Fault.drop()])
        reader, writer = await asyncio.open_connection(api.server.host, api.server.port)
        try:
            writer.write(
                b"GET /v1/tasks/runs/trun_x HTTP/1.1\r\nHost: fake\r\nx-api-key: test-key\r\n\r\n"
            )
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
            await writer.wait_closed()


async def test_dropped_get_is_retried_once_by_aiohttp_itself() -> None:
    # aiohttp re-sends an idempotent request once after a disconnect; a client
    # test that wants its own retry logic to see a drop must script two.
    async with serving() as api:
        run_id = await api.new_run()
        api.fake.faults.script("result", [Fault.drop(), Fault.drop()])
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await api.result(run_id)
        assert api.fake.stats.requests["result"] == 2
        api.fake.faults.script("result", [Fault.drop()])
        assert (await api.result(run_id)).status == 200


async def test_drop_after_creates_the_run_but_never_answers() -> None:
    async with serving() as api:
        api.fake.faults.script("create", [Fault.drop_after()])
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await api.create({"input": "ambiguous", "processor": "core"})
        assert api.fake.stats.runs_created == 1
        (run_id,) = api.fake.runs
        assert (await api.retrieve(run_id)).body["run_id"] == run_id
        assert api.fake.stats.statuses[202] == 0


async def test_slow_fault_delays_the_answer() -> None:
    async with serving() as api:
        run_id = await api.new_run()
        api.fake.faults.script("retrieve", [Fault.slow(0.05)])
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await api.retrieve(run_id)).status == 200
        assert loop.time() - started >= 0.05


async def test_malformed_fault_sends_invalid_json() -> None:
    async with serving() as api:
        api.fake.faults.script("*", [Fault.malformed()])
        reply = await api.create({"input": "q", "processor": "core"}, validate=False)
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "application/json"
        with pytest.raises(json.JSONDecodeError):
            json.loads(reply.raw)
        assert api.fake.stats.runs_created == 0


async def test_wildcard_script_applies_to_any_endpoint_after_specific_ones() -> None:
    async with serving() as api:
        run_id = await api.new_run()
        api.fake.faults.script("*", [Fault.status(500)])
        api.fake.faults.script("input", [Fault.status(502)])
        assert (await api.input(run_id)).status == 502
        assert (await api.input(run_id)).status == 500
        assert (await api.input(run_id)).status == 200
        api.fake.faults.script("*", [Fault.status(500)])
        api.fake.faults.clear()
        assert (await api.retrieve(run_id)).status == 200


async def test_fault_probabilities_are_reproducible_with_a_seed() -> None:
    async def statuses(seed: int) -> list[int]:
        async with serving(seed=seed) as api:
            run_id = await api.new_run()
            api.fake.faults.probabilities(
                "retrieve", {Fault.status(500): 0.3, Fault.status(503): 0.2}
            )
            return [(await api.retrieve(run_id)).status for _ in range(40)]

    first, again = await statuses(7), await statuses(7)
    assert first == again
    assert {200, 500, 503} == set(first)


def test_fault_configuration_errors() -> None:
    fake = FakeParallel()
    with pytest.raises(ValueError, match="unknown endpoint"):
        fake.faults.script("creat", [Fault.drop()])
    with pytest.raises(ValueError, match="sum to at most 1"):
        fake.faults.probabilities("create", {Fault.drop(): 0.7, Fault.status(500): 0.4})
    with pytest.raises(ValueError, match="4xx or 5xx"):
        Fault.status(200)
    with pytest.raises(ValueError, match="seconds"):
        Fault.slow(-1)


# --- stats and connections -----------------------------------------------------------------


async def test_concurrent_result_requests_and_connections_are_counted() -> None:
    count = 25
    async with serving(manual=True, max_long_poll=None) as api:
        run_ids = [await api.new_run() for _ in range(count)]
        polls = [asyncio.ensure_future(api.result(run_id, timeout=30)) for run_id in run_ids]
        await eventually(lambda: api.fake.stats.result_in_flight == count)
        # Each held request occupies its own connection.
        assert api.fake.stats.open_connections >= count
        for run_id in run_ids:
            api.fake.complete(run_id)
        replies = await asyncio.gather(*polls)
        assert [reply.status for reply in replies] == [200] * count
        stats = api.fake.stats
        assert stats.result_in_flight == 0
        assert stats.max_result_in_flight == count
        assert stats.max_open_connections >= count
        assert stats.requests["create"] == count
        assert stats.requests["result"] == count
        assert stats.statuses[202] == count
        assert stats.statuses[200] == count
        await api.session.close()
        await eventually(lambda: stats.open_connections == 0)
        assert stats.connections_total >= count


async def test_result_requests_are_counted_per_run() -> None:
    async with serving(manual=True, max_long_poll=None) as api:
        shared, other = await api.new_run(), await api.new_run()
        polls = [asyncio.ensure_future(api.result(shared, timeout=30)) for _ in range(3)]
        polls.append(asyncio.ensure_future(api.result(other, timeout=30)))
        stats = api.fake.stats
        await eventually(lambda: stats.result_in_flight == 4)
        assert stats.result_open_by_run == {shared: 3, other: 1}
        api.fake.complete(shared)
        api.fake.complete(other)
        assert [r.status for r in await asyncio.gather(*polls)] == [200] * 4
        assert await api.result(shared, timeout=0) is not None  # answered at once: counted too
        assert stats.result_requests_by_run == {shared: 4, other: 1}
        assert stats.max_result_open_by_run == {shared: 3, other: 1}
        assert not stats.result_open_by_run
        stats.reset()
        assert not stats.result_requests_by_run
        assert not stats.max_result_open_by_run


async def test_client_hanging_up_ends_its_held_result() -> None:
    async with serving(manual=True, max_long_poll=None) as api:
        run_id = await api.new_run()
        poll = asyncio.ensure_future(api.result(run_id, timeout=30))
        await eventually(lambda: api.fake.stats.result_in_flight == 1)
        poll.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poll
        await eventually(lambda: api.fake.stats.result_in_flight == 0)
        assert api.fake.runs[run_id].is_active


async def test_stats_reset() -> None:
    async with serving() as api:
        await api.new_run()
        api.fake.stats.reset()
        assert api.fake.stats.requests["create"] == 0
        assert api.fake.stats.runs_created == 0
        assert api.fake.stats.statuses == {}
        assert api.fake.stats.max_open_connections == api.fake.stats.open_connections


# --- contract with the official OpenAPI document -------------------------------------------


async def test_every_response_matches_the_official_spec() -> None:
    if spec_registry() is None:
        pytest.skip(f"official OpenAPI document not found at {SPEC_PATH}")
    # Api.call validates every JSON body it receives; this test makes sure each
    # endpoint/status pair the fake can produce goes through it at least once.
    async with serving(manual=True, create_rate_limit=(7, 60)) as api:
        json_spec = {"output_schema": {"type": "json", "json_schema": RICH_SCHEMA}}
        full = {
            "metadata": {"a": "b", "n": 2, "f": 1.5, "t": True},
            "task_spec": {**json_spec, "input_schema": {"type": "text", "description": "d"}},
            "source_policy": {
                "include_domains": ["a.com"],
                "exclude_domains": [],
                "after_date": None,
            },
            "advanced_settings": {"location": "us"},
            "previous_interaction_id": "trun_" + "1" * 32,
            "mcp_servers": [
                {"type": "url", "name": "m", "url": "https://m.example", "headers": {"a": "b"}}
            ],
            "enable_events": True,
            "webhook": {"url": "https://hook.example", "event_types": ["task_run.status"]},
        }
        json_run = await api.new_run(**full)
        text_run = await api.new_run(task_spec={"output_schema": "Summary"})
        auto_run = await api.new_run()
        failed, cancelled = await api.new_run(), await api.new_run()
        await api.retrieve(json_run)  # running
        await api.result(json_run, timeout=0)  # 408
        api.fake.fail(failed)
        api.fake.cancel(cancelled)
        for run_id in (json_run, text_run, auto_run):
            api.fake.complete(run_id)
            assert (await api.result(run_id)).status == 200
        for run_id in (json_run, failed, cancelled):
            assert (await api.retrieve(run_id)).status == 200
            assert (await api.input(run_id)).status == 200
        assert (await api.result(failed)).status == 404
        assert (await api.result(json_run, timeout="x")).status == 422
        assert (await api.create({"input": "q", "processor": "nope"})).status == 403
        assert (await api.create({"input": "q"})).status == 422
        assert (await api.create({"input": "q", "processor": "core"}, key=None)).status == 401
        assert (await api.create({"input": "q", "processor": "core"})).status == 429
        assert (await api.retrieve("trun_x")).status == 404
        assert (await api.input("trun_x", key="bad")).status == 401
        api.fake.faults.script("retrieve", [Fault.status(503)])
        assert (await api.retrieve(json_run)).status == 503


# --- the official SDK, unmodified ----------------------------------------------------------


async def test_official_sdk_round_trip() -> None:
    parallel = pytest.importorskip("parallel")
    async with serving() as api:
        client = parallel.AsyncParallel(api_key=API_KEY, base_url=api.server.url)
        try:
            run = await client.task_run.create(
                input="What is the GDP of France?",
                processor="core",
                metadata={"source": "sdk"},
                task_spec={"output_schema": {"type": "json", "json_schema": RICH_SCHEMA}},
            )
            assert RUN_ID.fullmatch(run.run_id)
            assert run.status == "queued"
            fetched = await client.task_run.retrieve(run.run_id)
            assert fetched.run_id == run.run_id
            result = await client.task_run.result(run.run_id, api_timeout=5)
            assert result.run.status == "completed"
            assert result.output.type == "json"
            jsonschema.validate(result.output.content, RICH_SCHEMA)
            assert result.output.basis[0].citations[0].url.startswith("https://")
            stored = await client.task_run.retrieve_input(run.run_id)
            assert stored.processor == "core"
            assert stored.metadata == {"source": "sdk"}
        finally:
            await client.close()


# --- packaging: plugin fixtures and the blocking entry point ---------------------------------


async def test_pytest_plugin_fixtures(fake_parallel: FakeParallel, fake_server: FakeServer) -> None:
    assert fake_server.fake is fake_parallel
    assert fake_parallel.max_long_poll == 0.05
    async with aiohttp.ClientSession() as session:
        headers = {"x-api-key": "test-key"}
        body = {"input": "q", "processor": "lite"}
        async with session.post(fake_server.url + RUNS, json=body, headers=headers) as response:
            assert response.status == 202
    assert fake_parallel.stats.runs_created == 1


class _StopServingError(Exception):
    pass


def test_run_fake_server_binds_and_shuts_down() -> None:
    urls: list[str] = []

    def ready(server: FakeServer) -> None:
        urls.append(server.url)
        raise _StopServingError

    with pytest.raises(_StopServingError):
        run_fake_server("127.0.0.1", 0, on_ready=ready)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", urls[0])

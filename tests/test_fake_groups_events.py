"""Tests of the fake server's task groups and SSE streams, over real HTTP on 127.0.0.1.

Time is driven by ``manual`` runs and ``fake.complete``/``fail``, zero durations and
tiny stream lifetimes; no test sleeps a fixed time. Every JSON body and every SSE
event's data is checked against the official OpenAPI document when it is present.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import pytest
from spec_contract import SPEC_PATH, check_contract, spec_registry

from parallel_async.testing import FakeParallel, FakeServer, Fault, RunPlan

pytestmark = pytest.mark.anyio

API_KEY = "test-key"
GROUPS = "/v1/tasks/groups"
GROUP = "/v1/tasks/groups/{taskgroup_id}"
GROUP_RUNS = "/v1/tasks/groups/{taskgroup_id}/runs"
GROUP_RUN = "/v1/tasks/groups/{taskgroup_id}/runs/{run_id}"
GROUP_EVENTS = "/v1/tasks/groups/{taskgroup_id}/events"
RUN_EVENTS = "/v1/tasks/runs/{run_id}/events"
GROUP_ID = re.compile(r"tgrp_[0-9a-f]{32}")
RUN_ID = re.compile(r"trun_[0-9a-f]{32}")
TEXT_SPEC = {"output_schema": "A one-line answer"}
JSON_SPEC = {
    "output_schema": {
        "type": "json",
        "json_schema": {
            "type": "object",
            "properties": {"gdp": {"type": "number"}},
            "required": ["gdp"],
            "additionalProperties": False,
        },
    }
}


# --- a small client over aiohttp -------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Any
    body: Any


@dataclass
class Event:
    type: str
    data: dict[str, Any]

    @property
    def id(self) -> str | None:
        event_id: str | None = self.data.get("event_id")
        return event_id


def parse_event(block: bytes) -> Event:
    lines = block.decode().strip("\n").split("\n")
    assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
    data = json.loads(lines[1][len("data: ") :])
    assert data["type"] == lines[0][len("event: ") :]
    return Event(data["type"], data)


class Stream:
    """An open SSE response, read one event at a time."""

    def __init__(self, response: aiohttp.ClientResponse, template: str) -> None:
        self.response = response
        self.template = template

    async def next(self) -> Event | None:
        """The next event, or ``None`` when the server ended the stream."""
        if self.response.content.at_eof():
            return None
        block = await self.response.content.readuntil(b"\n\n")
        if not block:
            return None
        assert block.endswith(b"\n\n"), block
        event = parse_event(block)
        check_contract("GET", self.template, 200, event.data, "text/event-stream")
        return event

    async def rest(self) -> list[Event]:
        events = []
        while (event := await self.next()) is not None:
            events.append(event)
        return events


@dataclass
class Api:
    fake: FakeParallel
    server: FakeServer
    session: aiohttp.ClientSession

    def url(self, template: str, **ids: str) -> str:
        return self.server.url + template.format(**ids)

    async def call(self, method: str, template: str, *, key: str = API_KEY, **kwargs: Any) -> Reply:
        ids = {k: kwargs.pop(k) for k in ("taskgroup_id", "run_id") if k in kwargs}
        headers = {"x-api-key": key}
        async with self.session.request(
            method, self.url(template, **ids), headers=headers, **kwargs
        ) as response:
            body = json.loads(await response.read())
            reply = Reply(response.status, response.headers, body)
        check_contract(method, template, reply.status, reply.body)
        return reply

    async def new_group(self, **body: Any) -> str:
        reply = await self.call("POST", GROUPS, json=body)
        assert reply.status == 200, reply.body
        group_id: str = reply.body["taskgroup_id"]
        return group_id

    async def add(self, group_id: str, inputs: list[Any], **body: Any) -> Reply:
        return await self.call(
            "POST", GROUP_RUNS, taskgroup_id=group_id, json={"inputs": inputs, **body}
        )

    async def add_ok(self, group_id: str, count: int, **fields: Any) -> dict[str, Any]:
        inputs = [{"input": f"q{i}", "processor": "core", **fields} for i in range(count)]
        reply = await self.add(group_id, inputs)
        assert reply.status == 200, reply.body
        body: dict[str, Any] = reply.body
        return body

    @asynccontextmanager
    async def stream(
        self, template: str, params: dict[str, str] | None = None, **ids: str
    ) -> AsyncIterator[Stream]:
        headers = {"x-api-key": API_KEY, "Accept": "text/event-stream"}
        async with self.session.get(
            self.url(template, **ids), headers=headers, params=params
        ) as response:
            assert response.status == 200, await response.read()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            yield Stream(response, template)

    async def events(
        self, template: str, params: dict[str, str] | None = None, **ids: str
    ) -> list[Event]:
        async with self.stream(template, params, **ids) as stream:
            return await stream.rest()


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[Api]:
    fake = FakeParallel(**options)
    try:
        async with FakeServer(fake) as server, aiohttp.ClientSession() as session:
            yield Api(fake, server, session)
    finally:
        fake.close()


async def settle(api: Api, group_id: str) -> None:
    """Wait (via the event stream itself) until the group's last status event is logged."""
    with anyio.fail_after(5):
        await api.events(GROUP_EVENTS, taskgroup_id=group_id)


# --- groups: create, retrieve, add runs ------------------------------------------------


async def test_create_and_retrieve_group() -> None:
    async with serving() as api:
        reply = await api.call("POST", GROUPS, json={"metadata": {"team": "a", "n": 2}})
        assert reply.status == 200
        group = reply.body
        assert GROUP_ID.fullmatch(group["taskgroup_id"])
        assert group["metadata"] == {"team": "a", "n": 2}
        status = group["status"]
        assert status["num_task_runs"] == 0
        assert status["task_run_status_counts"] == {}
        assert status["is_active"] is False
        fetched = await api.call("GET", GROUP, taskgroup_id=group["taskgroup_id"])
        assert fetched.body["taskgroup_id"] == group["taskgroup_id"]
        assert fetched.body["created_at"] == group["created_at"]
        assert list(api.fake.groups) == [group["taskgroup_id"]]
        empty = await api.call("POST", GROUPS, data=b"")
        assert empty.status == 200
        assert empty.body["metadata"] is None
        missing = await api.call("GET", GROUP, taskgroup_id="tgrp_nope")
        assert missing.status == 404
        assert missing.body["error"]["message"] == "TaskGroup not found"
        bad = await api.call("POST", GROUPS, json={"metadata": {"k": [1]}})
        assert bad.status == 422
        assert bad.body["detail"][0]["loc"] == ["body", "metadata", "k"]
        assert (await api.call("POST", GROUPS, json={}, key="wrong")).status == 401


async def test_add_runs_keeps_input_order_and_tracks_group_status() -> None:
    async with serving(manual=True) as api:
        group_id = await api.new_group()
        inputs = [
            {"input": "first", "processor": "core"},
            {"input": "second", "processor": "lite", "task_spec": JSON_SPEC},
            {"input": {"company": "Acme"}, "processor": "pro"},
        ]
        reply = await api.add(group_id, inputs, default_task_spec=TEXT_SPEC)
        assert reply.status == 200, reply.body
        first = reply.body
        assert first["run_cursor"] is None and first["event_cursor"] is None
        run_ids = first["run_ids"]
        assert [api.fake.runs[r].input["input"] for r in run_ids] == [
            "first",
            "second",
            {"company": "Acme"},
        ]
        assert api.fake.runs[run_ids[0]].input["task_spec"] == TEXT_SPEC
        assert api.fake.runs[run_ids[1]].input["task_spec"] == JSON_SPEC
        assert first["status"]["num_task_runs"] == 3
        assert first["status"]["task_run_status_counts"] == {"queued": 3}
        assert first["status"]["is_active"] is True
        run = await api.call("GET", GROUP_RUN, taskgroup_id=group_id, run_id=run_ids[0])
        assert run.status == 200 and run.body["taskgroup_id"] == group_id
        second = await api.add_ok(group_id, 2)
        assert second["run_cursor"] == "3"
        assert second["event_cursor"] == "1"  # the status event logged by the first add
        api.fake.complete(run_ids[0])
        api.fake.fail(run_ids[1], "boom")
        status = (await api.call("GET", GROUP, taskgroup_id=group_id)).body["status"]
        assert status["num_task_runs"] == 5
        assert status["task_run_status_counts"] == {"running": 3, "completed": 1, "failed": 1}
        assert status["is_active"] is True
        other = await api.new_group()
        wrong = await api.call("GET", GROUP_RUN, taskgroup_id=other, run_id=run_ids[0])
        assert wrong.status == 404
        assert wrong.body["error"]["message"] == "Run id not found"
        gone = await api.call("GET", GROUP_RUN, taskgroup_id="tgrp_x", run_id=run_ids[0])
        assert gone.body["error"]["message"] == "TaskGroup not found"
        assert api.fake.stats.requests["group_add_runs"] == 2
        assert api.fake.stats.runs_created == 5


async def test_add_runs_validation_is_all_or_nothing() -> None:
    async with serving(manual=True) as api:
        group_id = await api.new_group()
        ok = {"input": "q", "processor": "core"}
        too_many = await api.add(group_id, [ok] * 1001)
        assert too_many.status == 422
        assert too_many.body["detail"][0]["loc"] == ["body", "inputs"]
        assert (await api.add(group_id, [])).status == 422
        assert (await api.call("POST", GROUP_RUNS, taskgroup_id=group_id, json={})).status == 422
        bad = await api.add(group_id, [ok, {"input": "q"}, {"input": 5, "processor": "core"}])
        assert bad.status == 422
        locs = [error["loc"] for error in bad.body["detail"]]
        assert locs == [["body", "inputs", 1, "processor"], ["body", "inputs", 2, "input"]]
        spec = await api.add(group_id, [ok], default_task_spec={"output_schema": {"type": "xml"}})
        assert spec.status == 422
        assert spec.body["detail"][0]["loc"][:2] == ["body", "default_task_spec"]
        forbidden = await api.add(group_id, [ok, {"input": "q", "processor": "nope"}])
        assert forbidden.status == 403
        bad_flag = await api.call(
            "POST",
            GROUP_RUNS,
            taskgroup_id=group_id,
            json={"inputs": [ok]},
            params={"refresh_status": "maybe"},
        )
        assert bad_flag.status == 422
        assert len(api.fake.runs) == 0
        assert (await api.add("tgrp_missing", [ok])).status == 404
        full = await api.call(
            "POST",
            GROUP_RUNS,
            taskgroup_id=group_id,
            json={"inputs": [ok] * 1000},
            params={"refresh_status": "false"},
        )
        assert full.status == 200 and len(full.body["run_ids"]) == 1000


async def test_add_runs_counts_once_per_post_against_the_rate_limit() -> None:
    async with serving(manual=True, create_rate_limit=(2, 60)) as api:
        group_id = await api.new_group()
        await api.add_ok(group_id, 300)
        await api.add_ok(group_id, 300)
        limited = await api.add(group_id, [{"input": "q", "processor": "core"}])
        assert limited.status == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert len(api.fake.runs) == 600
        assert api.fake.stats.rate_limited == 1


# --- group event stream -------------------------------------------------------------------


async def test_group_events_live_then_resume_without_loss_or_duplicates() -> None:
    async with serving(manual=True) as api:
        group_id = await api.new_group()
        a, b, c = (await api.add_ok(group_id, 3))["run_ids"]
        seen: list[Event] = []
        async with api.stream(GROUP_EVENTS, taskgroup_id=group_id) as stream:
            first = await stream.next()
            assert first is not None and first.type == "task_group_status"
            assert first.data["status"]["num_task_runs"] == 3
            api.fake.complete(a)
            run_event, status_event = await stream.next(), await stream.next()
            assert run_event is not None and status_event is not None
            assert run_event.type == "task_run.state"
            assert run_event.data["run"]["run_id"] == a
            assert run_event.data["run"]["status"] == "completed"
            assert run_event.data["input"] is None and run_event.data["output"] is None
            assert status_event.data["status"]["task_run_status_counts"]["completed"] == 1
            seen += [first, run_event, status_event]
        # Client gone; more happens meanwhile, then it resumes from its last cursor.
        api.fake.fail(b)
        api.fake.cancel(c)
        async with api.stream(
            GROUP_EVENTS, {"last_event_id": str(seen[-1].id)}, taskgroup_id=group_id
        ) as stream:
            rest = await stream.rest()  # ends by itself: the group is inactive
        seen += rest
        ids = [event.id for event in seen]
        assert ids == [str(n) for n in range(1, len(seen) + 1)]
        finished = [e.data["run"]["run_id"] for e in seen if e.type == "task_run.state"]
        assert finished == [a, b, c]
        last = seen[-1]
        assert last.type == "task_group_status"
        assert last.data["status"]["is_active"] is False
        assert last.data["status"]["task_run_status_counts"] == {
            "completed": 1,
            "failed": 1,
            "cancelled": 1,
        }
        # b and c finished in one loop iteration: one coalesced status event after both.
        assert [e.type for e in rest] == ["task_run.state", "task_run.state", "task_group_status"]
        replay = await api.events(GROUP_EVENTS, taskgroup_id=group_id)
        assert [e.data for e in replay] == [e.data for e in seen]


async def test_event_cursor_of_a_batch_resumes_at_that_batch() -> None:
    async with serving(manual=True) as api:
        group_id = await api.new_group()
        (early,) = (await api.add_ok(group_id, 1))["run_ids"]
        api.fake.complete(early)
        await settle(api, group_id)
        batch = await api.add_ok(group_id, 2)
        for run_id in batch["run_ids"]:
            api.fake.complete(run_id)
        events = await api.events(
            GROUP_EVENTS, {"last_event_id": batch["event_cursor"]}, taskgroup_id=group_id
        )
        assert events[0].type == "task_group_status"
        assert events[0].data["status"]["num_task_runs"] == 3
        assert int(str(events[0].id)) == int(batch["event_cursor"]) + 1
        finished = [e.data["run"]["run_id"] for e in events if e.type == "task_run.state"]
        assert finished == batch["run_ids"]


async def test_group_events_end_on_timeout_and_lifetime_while_active() -> None:
    async with serving(manual=True, stream_lifetime=0.05) as api:
        group_id = await api.new_group()
        await api.add_ok(group_id, 2)
        with anyio.fail_after(5):
            at_once = await api.events(GROUP_EVENTS, {"timeout": "0"}, taskgroup_id=group_id)
            assert [e.type for e in at_once] == ["task_group_status"]
            by_lifetime = await api.events(GROUP_EVENTS, taskgroup_id=group_id)
            assert [e.type for e in by_lifetime] == ["task_group_status"]
        assert api.fake.groups[group_id].is_active
        for params in ({"last_event_id": "abc"}, {"last_event_id": "99"}, {"timeout": "x"}):
            reply = await api.call("GET", GROUP_EVENTS, taskgroup_id=group_id, params=params)
            assert reply.status == 422
            assert reply.body["detail"][0]["loc"][0] == "query"
        missing = await api.call("GET", GROUP_EVENTS, taskgroup_id="tgrp_x")
        assert missing.status == 404
        assert api.fake.stats.streams_total == 2
        assert api.fake.stats.streams_open == 0


async def test_group_of_ten_thousand_runs_streams_every_event_once() -> None:
    async with serving(duration=0.0) as api:
        group_id = await api.new_group()
        inputs = [{"input": "q", "processor": "lite"}] * 1000
        for _ in range(10):
            assert (await api.add(group_id, inputs)).status == 200
        url, headers = api.url(GROUP_EVENTS, taskgroup_id=group_id), {"x-api-key": API_KEY}
        with anyio.fail_after(20):
            async with api.session.get(url, headers=headers) as response:
                raw = await response.read()
        # Parsed without the (slow) schema check: this test is about volume.
        events = [parse_event(block + b"\n\n") for block in raw.split(b"\n\n")[:-1]]
        finished = {e.data["run"]["run_id"] for e in events if e.type == "task_run.state"}
        assert len(finished) == 10_000
        assert [e.id for e in events] == [str(n) for n in range(1, len(events) + 1)]
        assert events[-1].data["status"]["task_run_status_counts"] == {"completed": 10_000}


# --- group runs snapshot stream --------------------------------------------------------------


async def test_group_runs_snapshot_with_filters_cursor_and_outputs() -> None:
    async with serving(manual=True) as api:
        group_id = await api.new_group()
        done, failed, running = (await api.add_ok(group_id, 3, task_spec=JSON_SPEC))["run_ids"]
        api.fake.complete(done, {"gdp": 3.1})
        api.fake.fail(failed)
        plain = await api.events(GROUP_RUNS, taskgroup_id=group_id)
        assert [e.id for e in plain] == ["1", "2", "3"]
        assert [e.data["run"]["run_id"] for e in plain] == [done, failed, running]
        assert all(e.data["input"] is None and e.data["output"] is None for e in plain)
        only = await api.events(GROUP_RUNS, {"status": "completed"}, taskgroup_id=group_id)
        assert [(e.id, e.data["run"]["run_id"]) for e in only] == [("1", done)]
        full = await api.events(
            GROUP_RUNS, {"include_input": "true", "include_output": "true"}, taskgroup_id=group_id
        )
        assert full[0].data["output"]["content"] == {"gdp": 3.1}
        assert full[1].data["output"] is None and full[2].data["output"] is None
        assert full[2].data["input"] == api.fake.runs[running].input
        resumed = await api.events(GROUP_RUNS, {"last_event_id": "1"}, taskgroup_id=group_id)
        assert [e.data["run"]["run_id"] for e in resumed] == [failed, running]
        later = await api.add_ok(group_id, 1)
        assert later["run_cursor"] == "3"
        tail = await api.events(
            GROUP_RUNS, {"last_event_id": later["run_cursor"]}, taskgroup_id=group_id
        )
        assert [e.data["run"]["run_id"] for e in tail] == later["run_ids"]
        bad = await api.call("GET", GROUP_RUNS, taskgroup_id=group_id, params={"status": "x"})
        assert bad.status == 422


# --- run event stream -----------------------------------------------------------------------


async def test_run_events_replay_live_messages_and_terminal_output() -> None:
    async with serving(manual=True) as api:
        reply = await api.session.post(
            api.url("/v1/tasks/runs"),
            json={"input": "GDP of France", "processor": "pro", "task_spec": TEXT_SPEC},
            headers={"x-api-key": API_KEY},
        )
        run_id = (await reply.json())["run_id"]
        reply.release()
        async with api.stream(RUN_EVENTS, run_id=run_id) as stream:
            state, plan, stats = await stream.next(), await stream.next(), await stream.next()
            assert state is not None and plan is not None and stats is not None
            assert state.type == "task_run.state" and state.data["event_id"] is None
            assert state.data["output"] is None
            assert plan.type == "task_run.progress_msg.plan"
            assert "GDP of France" in plan.data["message"]
            assert stats.type == "task_run.progress_stats"
            assert 0 <= stats.data["progress_meter"] < 100
            api.fake.complete(run_id, "About 3 trillion USD")
            live = await stream.rest()
        kinds = [e.type for e in live]
        assert kinds == [
            "task_run.progress_msg.search",
            "task_run.progress_msg.search",
            "task_run.progress_msg.result",
            "task_run.progress_msg.exec_status",
            "task_run.progress_stats",
            "task_run.state",
        ]
        assert live[-2].data["progress_meter"] == 100
        final = live[-1].data
        assert final["run"]["status"] == "completed"
        assert final["output"]["content"] == "About 3 trillion USD"
        # Not resumable: every connection replays the same trace, same timestamps.
        replay = await api.events(RUN_EVENTS, run_id=run_id)
        messages = [e.data for e in [plan, *live] if e.type.startswith("task_run.progress_msg")]
        assert [e.data for e in replay if e.type.startswith("task_run.progress_msg")] == messages
        assert replay[-1].data == final
        missing = await api.call("GET", RUN_EVENTS, run_id="trun_x")
        assert missing.status == 404


async def test_run_events_of_a_timed_run_arrive_over_its_duration() -> None:
    async with serving(plan=lambda body: RunPlan(duration=0.08)) as api:
        group_id = await api.new_group()
        (run_id,) = (await api.add_ok(group_id, 1))["run_ids"]
        with anyio.fail_after(5):
            events = await api.events(RUN_EVENTS, run_id=run_id)
        messages = [e.data for e in events if e.type.startswith("task_run.progress_msg")]
        assert len(messages) == 5
        stamps = [m["timestamp"] for m in messages]
        assert stamps == sorted(stamps) and len(set(stamps)) >= 4
        meters = [e.data["progress_meter"] for e in events if e.type == "task_run.progress_stats"]
        assert meters == sorted(meters) and meters[-1] == 100
        assert events[-1].data["run"]["status"] == "completed"
        assert events[-1].data["run"]["taskgroup_id"] == group_id


async def test_run_stream_lifetime_closes_the_stream_mid_run() -> None:
    async with serving(manual=True, run_stream_lifetime=0.02) as api:
        group_id = await api.new_group()
        (run_id,) = (await api.add_ok(group_id, 1))["run_ids"]
        with anyio.fail_after(5):
            first = await api.events(RUN_EVENTS, run_id=run_id)
            second = await api.events(RUN_EVENTS, run_id=run_id)
        assert [e.type for e in first] == [
            "task_run.state",
            "task_run.progress_msg.plan",
            "task_run.progress_stats",
        ]
        assert first[0].data["run"]["status"] in ("queued", "running")
        assert [e.data for e in second[1:]] == [e.data for e in first[1:]]
        api.fake.complete(run_id)
        done = await api.events(RUN_EVENTS, run_id=run_id)
        assert done[-1].data["run"]["status"] == "completed" and done[-1].data["output"]


# --- faults and stats on streams ---------------------------------------------------------------


async def _raw_until_cut(api: Api, template: str, **ids: str) -> bytes:
    received = b""
    headers = {"x-api-key": API_KEY}
    async with api.session.get(api.url(template, **ids), headers=headers) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received += chunk
    return received


async def test_cut_stream_fault_breaks_the_stream_mid_event() -> None:
    async with serving(manual=True) as api:
        group_id = await api.new_group()
        for run_id in (await api.add_ok(group_id, 3))["run_ids"]:
            api.fake.complete(run_id)
        full = await api.events(GROUP_EVENTS, taskgroup_id=group_id)
        api.fake.faults.script("group_events", [Fault.cut_stream(after_events=2)])
        raw = await _raw_until_cut(api, GROUP_EVENTS, taskgroup_id=group_id)
        *whole, partial = raw.split(b"\n\n")
        assert [parse_event(block + b"\n\n").data for block in whole] == [e.data for e in full[:2]]
        assert partial and not partial.endswith(b"}")
        api.fake.faults.script("run_events", [Fault.cut_stream(0)])
        half = await _raw_until_cut(api, RUN_EVENTS, run_id=next(iter(api.fake.runs)))
        assert half.startswith(b"event: task_run.state") and b"\n\n" not in half
        api.fake.faults.probabilities("group_runs", {Fault.cut_stream(1): 1.0})
        raw_runs = await _raw_until_cut(api, GROUP_RUNS, taskgroup_id=group_id)
        assert raw_runs.count(b"\n\n") == 1
        api.fake.faults.clear()
        assert len(await api.events(GROUP_EVENTS, taskgroup_id=group_id)) == len(full)
        stats = api.fake.stats
        assert stats.streams_cut == 3
        assert stats.streams_open == 0
        assert stats.requests["group_events"] == 3


async def test_drop_after_on_add_runs_creates_the_runs_and_hangs_up() -> None:
    async with serving(manual=True) as api:
        group_id = await api.new_group()
        api.fake.faults.script("group_add_runs", [Fault.drop_after()])
        inputs = [{"input": "q", "processor": "core"}] * 2
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.add(group_id, inputs)
        group = api.fake.groups[group_id]
        assert group.num_runs == 2
        assert api.fake.stats.dropped == 1 and api.fake.stats.runs_created == 2
        api.fake.faults.script("group_retrieve", [Fault.status(503)])
        assert (await api.call("GET", GROUP, taskgroup_id=group_id)).status == 503
        assert (await api.call("GET", GROUP, taskgroup_id=group_id)).status == 200


def test_fault_names_and_cut_stream_arguments() -> None:
    fake = FakeParallel()
    for name in (
        "group_create",
        "group_retrieve",
        "group_add_runs",
        "group_events",
        "group_runs",
        "group_run",
        "run_events",
    ):
        fake.faults.script(name, [Fault.drop()])
    with pytest.raises(ValueError, match=">= 0"):
        Fault.cut_stream(-1)
    with pytest.raises(TypeError):
        Fault.cut_stream(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stream_lifetime"):
        FakeParallel(stream_lifetime=-1)


async def test_open_streams_and_events_are_counted() -> None:
    async with serving(manual=True) as api:
        group_id = await api.new_group()
        (run_id,) = (await api.add_ok(group_id, 1))["run_ids"]
        async with (
            api.stream(GROUP_EVENTS, taskgroup_id=group_id) as one,
            api.stream(RUN_EVENTS, run_id=run_id) as two,
        ):
            assert await one.next() is not None and await two.next() is not None
            assert api.fake.stats.streams_open == 2
            api.fake.complete(run_id)
            await one.rest()
            await two.rest()
        stats = api.fake.stats
        assert stats.max_streams_open == 2
        # group: status, run, status; run: state, plan, stats, 4 messages, stats, state.
        assert stats.events_sent == 3 + 9
        stats.reset()
        assert stats.events_sent == 0 and stats.streams_total == 0


# --- contract with the official OpenAPI document -----------------------------------------------


async def test_every_group_and_event_response_matches_the_official_spec() -> None:
    if spec_registry() is None:
        pytest.skip(f"official OpenAPI document not found at {SPEC_PATH}")
    # Api.call and Stream.next validate every body and event; this walks each shape.
    async with serving(manual=True) as api:
        group_id = await api.new_group(metadata={"a": "b", "n": 1, "f": 0.5, "t": True})
        await api.call("POST", GROUPS, json={"metadata": "x"})  # 422
        await api.call("GET", GROUP, taskgroup_id="tgrp_x")  # 404
        run_ids = (await api.add_ok(group_id, 4, task_spec=JSON_SPEC))["run_ids"]
        await api.add(group_id, [{"input": "q"}])  # 422
        await api.add(group_id, [{"input": "q", "processor": "nope"}])  # 403
        api.fake.complete(run_ids[0])
        api.fake.fail(run_ids[1])
        api.fake.cancel(run_ids[2])
        api.fake.complete(run_ids[3], "text instead")
        await api.call("GET", GROUP, taskgroup_id=group_id)
        await api.call("GET", GROUP_RUN, taskgroup_id=group_id, run_id=run_ids[0])
        await api.call("GET", GROUP_RUN, taskgroup_id=group_id, run_id="trun_x")  # 404
        await api.call("GET", GROUP_RUNS, taskgroup_id=group_id, params={"status": "?"})  # 422
        events = await api.events(GROUP_EVENTS, taskgroup_id=group_id)
        assert {e.type for e in events} == {"task_group_status", "task_run.state"}
        params = {"include_input": "true", "include_output": "true"}
        assert len(await api.events(GROUP_RUNS, params, taskgroup_id=group_id)) == 4
        for run_id in run_ids:
            assert (await api.events(RUN_EVENTS, run_id=run_id))[-1].type == "task_run.state"


# --- the official SDK, unmodified -----------------------------------------------------------


async def test_official_sdk_task_groups_and_run_events() -> None:
    parallel = pytest.importorskip("parallel")
    async with serving(duration=0.0) as api:
        client = parallel.AsyncParallel(api_key=API_KEY, base_url=api.server.url)
        try:
            group = await client.task_group.create(metadata={"source": "sdk"})
            assert GROUP_ID.fullmatch(group.task_group_id)
            added = await client.task_group.add_runs(
                group.task_group_id,
                inputs=[{"input": f"q{i}", "processor": "core"} for i in range(3)],
                default_task_spec=JSON_SPEC,
            )
            assert len(added.run_ids) == 3 and added.event_cursor is None
            events = [e async for e in await client.task_group.events(group.task_group_id)]
            finished = [e.run.run_id for e in events if e.type == "task_run.state"]
            assert sorted(finished) == sorted(added.run_ids)
            assert events[-1].type == "task_group_status"
            assert events[-1].status.is_active is False
            fetched = await client.task_group.retrieve(group.task_group_id)
            assert fetched.status.task_run_status_counts == {"completed": 3}
            runs = [
                e
                async for e in await client.task_group.get_runs(
                    group.task_group_id, include_output=True, include_input=True
                )
            ]
            assert [e.run.run_id for e in runs] == added.run_ids
            assert all(e.output is not None and e.output.type == "json" for e in runs)
            run = await client.task_group.retrieve_run(
                added.run_ids[0], task_group_id=group.task_group_id
            )
            assert run.task_group_id == group.task_group_id
            run_events = [e async for e in await client.task_run.events(added.run_ids[0])]
            assert run_events[0].type == "task_run.state"
            assert run_events[-1].type == "task_run.state"
            assert run_events[-1].output is not None
            assert any(e.type == "task_run.progress_stats" for e in run_events)
        finally:
            await client.close()

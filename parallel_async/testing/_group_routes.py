"""aiohttp routes of the task-group endpoints (``/v1/tasks/groups...``).

Endpoint names for faults and ``stats.requests``: ``group_create``,
``group_retrieve``, ``group_add_runs``, ``group_run``, ``group_events`` and
``group_runs``. 422s use FastAPI's ``HTTPValidationError`` shape, as the spec
declares for these endpoints; 404s and the other errors use ``ErrorResponse``.

An ``add_runs`` accepted while the group store makes adds slow (``add_delay``,
``hold_adds``) creates its runs in a task of its own: a client hanging up does not stop
it. ``Fault.drop_after()`` on such an add hangs up as soon as it is accepted, before its
runs exist: the lost answer of a request the server is still working on.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ._app import check_auth, count_created, endpoint
from ._faults import CURRENT_FAULT
from ._groups import GroupRecord
from ._sse import EventStream, parse_bool, parse_cursor, parse_seconds
from ._state import RunRecord
from ._validation import PROCESSORS, validate_metadata, validate_task_run_input
from ._wire import (
    FORBIDDEN_PROCESSOR,
    RATE_LIMITED,
    RUN_NOT_FOUND,
    TASKGROUP_NOT_FOUND,
    encode,
    error_response,
    json_response,
    validation_response,
)

if TYPE_CHECKING:
    from ._fake import FakeParallel

__all__ = ["MAX_INPUTS_PER_REQUEST", "GroupRoutes", "run_state_event"]

MAX_INPUTS_PER_REQUEST = 1000
_STATUSES = frozenset(
    ("queued", "action_required", "running", "completed", "failed", "cancelling", "cancelled")
)


def run_state_event(
    record: RunRecord, event_id: str | None, task_input: object = None, output: object = None
) -> bytes:
    """Encoded ``TaskRunEvent`` (reuses the run's cached ``TaskRun`` bytes)."""
    return (
        b'{"type":"task_run.state","event_id":'
        + encode(event_id)
        + b',"run":'
        + record.run_body()
        + b',"input":'
        + encode(task_input)
        + b',"output":'
        + encode(output)
        + b"}"
    )


def _status_event(event_id: str, status: bytes) -> bytes:
    head = b'{"type":"task_group_status","event_id":' + encode(event_id)
    return head + b',"status":' + status + b"}"


def _field_error(loc: list[Any], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind}


def _relocate(errors: list[Any], prefix: list[Any], rename: str | None = None) -> list[Any]:
    """Move ``body``-relative error locations under ``prefix`` (optionally renaming)."""
    moved = []
    for error in errors:
        rest = list(error["loc"][1:])
        if rename is not None and rest:
            rest[0] = rename
        moved.append({**error, "loc": ["body", *prefix, *rest]})
    return moved


def _decode(raw: bytes, *, empty_ok: bool) -> object:
    if not raw.strip() and empty_ok:
        return {}
    return msgspec.json.decode(raw)


class GroupRoutes:
    """Handlers of ``/v1/tasks/groups`` and its sub-resources."""

    def __init__(self, fake: FakeParallel) -> None:
        self.fake = fake

    def register(self, app: web.Application) -> None:
        """Add the task-group routes to ``app``."""
        fake, router = self.fake, app.router
        groups = "/v1/tasks/groups"
        group = groups + "/{taskgroup_id}"
        router.add_post(groups, endpoint(fake, "group_create", self.create))
        router.add_get(group, endpoint(fake, "group_retrieve", self.retrieve), allow_head=False)
        router.add_post(f"{group}/runs", endpoint(fake, "group_add_runs", self.add_runs))
        router.add_get(
            f"{group}/runs", endpoint(fake, "group_runs", self.runs_stream), allow_head=False
        )
        router.add_get(
            f"{group}/runs/{{run_id}}",
            endpoint(fake, "group_run", self.retrieve_run),
            allow_head=False,
        )
        router.add_get(
            f"{group}/events", endpoint(fake, "group_events", self.events), allow_head=False
        )

    def _group(self, request: web.Request) -> GroupRecord | web.Response:
        denied = check_auth(self.fake, request)
        if denied is not None:
            return denied
        taskgroup_id = request.match_info["taskgroup_id"]
        group = self.fake.group_store.get(taskgroup_id)
        if group is None:
            return error_response(404, TASKGROUP_NOT_FOUND, {"taskgroup_id": taskgroup_id})
        return group

    async def create(self, request: web.Request) -> web.Response:
        """``POST /v1/tasks/groups``: a new, empty group."""
        denied = check_auth(self.fake, request)
        if denied is not None:
            return denied
        try:
            body = _decode(await request.read(), empty_ok=True)
        except msgspec.DecodeError as exc:
            return validation_response([_field_error(["body"], f"Invalid JSON: {exc}", "json")])
        if not isinstance(body, dict):
            error = _field_error(["body"], "Input should be a JSON object", "model_type")
            return validation_response([error])
        metadata = body.get("metadata")
        errors = validate_metadata(metadata)
        if errors:
            return validation_response(list(errors))
        group = self.fake.group_store.create(metadata)
        return json_response(encode(group.to_wire()))

    async def retrieve(self, request: web.Request) -> web.Response:
        """``GET /v1/tasks/groups/{taskgroup_id}``: the group and its aggregate status."""
        group = self._group(request)
        if isinstance(group, web.Response):
            return group
        return json_response(encode(group.to_wire()))

    async def retrieve_run(self, request: web.Request) -> web.Response:
        """``GET /v1/tasks/groups/{taskgroup_id}/runs/{run_id}``: one run of the group."""
        group = self._group(request)
        if isinstance(group, web.Response):
            return group
        run_id = request.match_info["run_id"]
        record = self.fake.store.get(run_id)
        if record is None or record.taskgroup_id != group.taskgroup_id:
            return error_response(404, RUN_NOT_FOUND, {"run_id": run_id})
        return json_response(record.run_body())

    def _validate_inputs(self, body: object) -> list[dict[str, Any]] | web.Response:
        """The create bodies of a ``TaskGroupRunRequest``, or its 422/403 response."""
        if not isinstance(body, dict):
            error = _field_error(["body"], "Input should be a JSON object", "model_type")
            return validation_response([error])
        inputs = body.get("inputs")
        if "inputs" not in body:
            error = _field_error(["body", "inputs"], "Field required", "missing")
            return validation_response([error])
        if not isinstance(inputs, list):
            error = _field_error(["body", "inputs"], "Input should be a valid list", "list_type")
            return validation_response([error])
        if not 1 <= len(inputs) <= MAX_INPUTS_PER_REQUEST:
            msg = f"List should have between 1 and {MAX_INPUTS_PER_REQUEST} items"
            kind = "too_short" if not inputs else "too_long"
            return validation_response([_field_error(["body", "inputs"], msg, kind)])
        default_spec = body.get("default_task_spec")
        errors: list[Any] = []
        if default_spec is not None:
            probe = {"input": "", "processor": "lite", "task_spec": default_spec}
            errors = _relocate(validate_task_run_input(probe), [], "default_task_spec")
        bodies: list[dict[str, Any]] = []
        for index, item in enumerate(inputs):
            merged = item
            if (
                not errors
                and default_spec is not None
                and isinstance(item, dict)
                and item.get("task_spec") is None
            ):
                merged = {**item, "task_spec": default_spec}
            errors.extend(_relocate(validate_task_run_input(merged), ["inputs", index]))
            if isinstance(merged, dict):
                bodies.append(merged)
        if errors:
            return validation_response(errors)
        for run_body in bodies:
            if run_body["processor"] not in PROCESSORS:
                processor = run_body["processor"]
                return error_response(403, FORBIDDEN_PROCESSOR, {"processor": processor})
        return bodies

    async def add_runs(self, request: web.Request) -> web.Response:
        """``POST /v1/tasks/groups/{taskgroup_id}/runs``: validate all, then create all.

        Counts once against ``create_rate_limit`` whatever the number of inputs.
        """
        fake = self.fake
        group = self._group(request)
        if isinstance(group, web.Response):
            return group
        if fake.limiter is not None:
            wait = fake.limiter.acquire()
            if wait is not None:
                return error_response(
                    429, RATE_LIMITED, {"retry_after": wait}, headers={"Retry-After": str(wait)}
                )
        refresh = parse_bool(request, "refresh_status", True)
        if isinstance(refresh, web.Response):
            return refresh
        try:
            body = _decode(await request.read(), empty_ok=False)
        except msgspec.DecodeError as exc:
            return validation_response([_field_error(["body"], f"Invalid JSON: {exc}", "json")])
        bodies = self._validate_inputs(body)
        if isinstance(bodies, web.Response):
            return bodies
        store = fake.group_store
        if not store.slow_adds:
            return json_response(encode(self._create_runs(group, bodies)))
        work = store.start_add(lambda: self._create_runs(group, bodies))
        fault = CURRENT_FAULT.get()
        if fault is not None and fault.kind == "drop_after":
            # endpoint() hangs up instead of sending this; the runs are created later.
            return web.Response(status=204)
        # Shielded: the client hanging up cancels this handler, never the work.
        return json_response(encode(await asyncio.shield(work)))

    def _create_runs(self, group: GroupRecord, bodies: list[dict[str, Any]]) -> dict[str, Any]:
        """Create the validated runs in order; the ``TaskGroupRunResponse`` body."""
        fake = self.fake
        run_cursor = str(group.num_runs) if group.num_runs else None
        event_cursor = str(len(group.log)) if group.log else None
        run_ids = []
        for run_body in bodies:
            record = fake.store.create(run_body, taskgroup_id=group.taskgroup_id)
            group.add(record)
            run_ids.append(record.run_id)
        count_created(fake, len(run_ids))
        group.log_status()
        return {
            "status": group.status(),
            "run_ids": run_ids,
            "run_cursor": run_cursor,
            "event_cursor": event_cursor,
        }

    async def events(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/tasks/groups/{taskgroup_id}/events``: the group event log, then live.

        Replays the log after ``last_event_id`` (from the start without one), then
        follows it; ends once the group is inactive and fully sent, after ``timeout``
        seconds, or after the fake's ``stream_lifetime``.
        """
        fake = self.fake
        group = self._group(request)
        if isinstance(group, web.Response):
            return group
        position = parse_cursor(request, len(group.log))
        if isinstance(position, web.Response):
            return position
        timeout = parse_seconds(request, "timeout")
        if isinstance(timeout, web.Response):
            return timeout
        clock = asyncio.get_running_loop().time
        limit = fake.stream_lifetime if timeout is None else min(timeout, fake.stream_lifetime)
        deadline = clock() + limit if math.isfinite(limit) else math.inf
        async with EventStream(fake, request) as stream:
            log = group.log
            while True:
                while position < len(log):
                    entry = log[position]
                    position += 1
                    event_id = str(position)
                    if isinstance(entry, bytes):
                        event_type, data = "task_group_status", _status_event(event_id, entry)
                    else:
                        event_type, data = "task_run.state", run_state_event(entry, event_id)
                    if not await stream.send(event_type, data):
                        return stream.response
                await stream.flush()
                remaining = deadline - clock()
                if group.settled or remaining <= 0 or stream.closed:
                    break
                await group.wait(min(remaining, 86400.0))
        return stream.response

    async def runs_stream(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/tasks/groups/{taskgroup_id}/runs``: a snapshot of the group's runs.

        One ``task_run.state`` event per run in the order runs were added, ``event_id``
        being the run's 1-based position; ``status`` filters, ``include_input`` and
        ``include_output`` (completed runs only) add fields. Closes when done.
        """
        fake = self.fake
        group = self._group(request)
        if isinstance(group, web.Response):
            return group
        position = parse_cursor(request, group.num_runs)
        if isinstance(position, web.Response):
            return position
        status = request.query.get("status")
        if status is not None and status not in _STATUSES:
            error = _field_error(["query", "status"], "Input should be a run status", "enum")
            return validation_response([error])
        include_input = parse_bool(request, "include_input", False)
        if isinstance(include_input, web.Response):
            return include_input
        include_output = parse_bool(request, "include_output", False)
        if isinstance(include_output, web.Response):
            return include_output
        async with EventStream(fake, request) as stream:
            run_ids, runs = group.run_ids, fake.store.runs
            while position < len(run_ids):
                record = runs[run_ids[position]]
                position += 1
                if status is not None and record.status != status:
                    continue
                task_input = record.input if include_input else None
                output = record.output if include_output else None
                data = run_state_event(record, str(position), task_input, output)
                if not await stream.send("task_run.state", data):
                    break
        return stream.response

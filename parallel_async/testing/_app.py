"""aiohttp routes of the task-run endpoints, plus the plumbing every endpoint shares.

``endpoint()`` wraps a handler with request counting, fault injection and status
counting, and ``check_auth()`` implements ``x-api-key``; future route modules (task
groups, SSE events) reuse both and register their own routes in ``build_app``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ._faults import CURRENT_FAULT
from ._validation import PROCESSORS, validate_task_run_input
from ._wire import (
    FORBIDDEN_PROCESSOR,
    INVALID_BODY,
    RATE_LIMITED,
    RESULT_NOT_FOUND,
    RUN_NOT_FOUND,
    TIMED_OUT,
    UNAUTHORIZED,
    VALIDATION_ERROR,
    encode,
    error_response,
    json_response,
)

if TYPE_CHECKING:
    from ._fake import FakeParallel

__all__ = ["Handler", "TaskRunRoutes", "build_app", "check_auth", "count_created", "endpoint"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_RESULT_TIMEOUT = 600
# Bigger waits are indistinguishable from forever and would overflow the loop's clock.
_MAX_RESULT_TIMEOUT = 10**9
_INTEGER = re.compile(r"[+-]?\d+")


_REQUEST_RUNS: ContextVar[list[int] | None] = ContextVar("parallel_fake_runs", default=None)


def count_created(fake: FakeParallel, runs: int) -> None:
    """Count ``runs`` created, in the stats and in the request log of the request making them."""
    fake.stats.runs_created += runs
    mine = _REQUEST_RUNS.get()
    if mine is not None:
        mine[0] += runs


def check_auth(fake: FakeParallel, request: web.Request) -> web.Response | None:
    """Return a 401 response if the request's ``x-api-key`` is missing or wrong."""
    key = request.headers.get("x-api-key")
    if key is None:
        return error_response(401, UNAUTHORIZED, {"reason": "missing x-api-key header"})
    if fake.api_key is not None and key != fake.api_key:
        return error_response(401, UNAUTHORIZED, {"reason": "invalid API key"})
    return None


def _drop(fake: FakeParallel, request: web.Request) -> web.Response:
    """Close the connection so the client sees a disconnect and no response bytes."""
    fake.stats.dropped += 1
    transport = request.transport
    if transport is not None:
        transport.close()
    # aiohttp then fails to write this placeholder to the closing transport and treats
    # it as a client disconnect: nothing is sent and nothing is logged as an error.
    return web.Response(status=500)


def endpoint(fake: FakeParallel, name: str, handler: Handler) -> Handler:
    """Wrap ``handler`` as endpoint ``name``: count it, inject faults, count statuses."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if fake.request_log is None:
            return await serve(request)
        created = [0]
        _REQUEST_RUNS.set(created)  # this request's task (and the adds it starts) only
        status: int | str = "cancelled"  # the client hung up while it was handled
        try:
            response = await serve(request)
            closed = request.transport is None or request.transport.is_closing()
            status = "dropped" if closed else response.status
            return response
        finally:
            fake.request_log(
                {
                    "time": time.time(),
                    "endpoint": name,
                    "method": request.method,
                    "path": request.path,
                    "status": status,
                    "runs_created": created[0],
                }
            )

    async def serve(request: web.Request) -> web.StreamResponse:
        fake.stats.requests[name] += 1
        fake.stats.betas[name, request.headers.get("parallel-beta", "")] += 1
        fault = fake.faults.draw(name)
        if fault is not None:
            if fault.kind == "drop":
                return _drop(fake, request)
            if fault.kind in ("status", "malformed"):
                response = fault.response()
                fake.stats.responded(response.status)
                return response
            if fault.kind == "slow":
                await asyncio.sleep(fault.seconds)
        token = CURRENT_FAULT.set(fault)
        try:
            result = await handler(request)
        finally:
            CURRENT_FAULT.reset(token)
        if fault is not None and fault.kind == "drop_after":
            return _drop(fake, request)
        fake.stats.responded(result.status)
        return result

    return handle


def _not_found(run_id: str, message: str = RUN_NOT_FOUND) -> web.Response:
    return error_response(404, message, {"run_id": run_id})


def _invalid(errors: list[Any], message: str = INVALID_BODY) -> web.Response:
    return error_response(422, message, {"errors": errors})


class TaskRunRoutes:
    """Handlers of ``/v1/tasks/runs`` and its per-run sub-resources."""

    def __init__(self, fake: FakeParallel) -> None:
        self.fake = fake

    def register(self, app: web.Application) -> None:
        """Add the task-run routes to ``app``."""
        fake, router = self.fake, app.router
        router.add_post("/v1/tasks/runs", endpoint(fake, "create", self.create))
        run = "/v1/tasks/runs/{run_id}"
        # No implicit HEAD routes: the API has none, and they would skew request counts.
        router.add_get(run, endpoint(fake, "retrieve", self.retrieve), allow_head=False)
        router.add_get(f"{run}/input", endpoint(fake, "input", self.input), allow_head=False)
        router.add_get(f"{run}/result", endpoint(fake, "result", self.result), allow_head=False)

    async def create(self, request: web.Request) -> web.Response:
        """``POST /v1/tasks/runs``: validate, create a queued run, answer 202."""
        fake = self.fake
        denied = check_auth(fake, request)
        if denied is not None:
            return denied
        if fake.limiter is not None:
            wait = fake.limiter.acquire()
            if wait is not None:
                return error_response(
                    429, RATE_LIMITED, {"retry_after": wait}, headers={"Retry-After": str(wait)}
                )
        raw = await request.read()
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            return _invalid([{"loc": ["body"], "msg": f"Invalid JSON: {exc}", "type": "json"}])
        errors = validate_task_run_input(body)
        if errors:
            return _invalid(list(errors))
        processor = body["processor"]
        if processor not in PROCESSORS:
            return error_response(403, FORBIDDEN_PROCESSOR, {"processor": processor})
        record = fake.store.create(body)
        count_created(fake, 1)
        return json_response(record.run_body(), status=202)

    async def retrieve(self, request: web.Request) -> web.Response:
        """``GET /v1/tasks/runs/{run_id}``: the current ``TaskRun``."""
        denied = check_auth(self.fake, request)
        if denied is not None:
            return denied
        run_id = request.match_info["run_id"]
        record = self.fake.store.get(run_id)
        if record is None:
            return _not_found(run_id)
        return json_response(record.run_body())

    async def input(self, request: web.Request) -> web.Response:
        """``GET /v1/tasks/runs/{run_id}/input``: the create body as stored."""
        denied = check_auth(self.fake, request)
        if denied is not None:
            return denied
        run_id = request.match_info["run_id"]
        record = self.fake.store.get(run_id)
        if record is None:
            return _not_found(run_id)
        return json_response(encode(record.input))

    async def result(self, request: web.Request) -> web.Response:
        """``GET /v1/tasks/runs/{run_id}/result``: long-poll until terminal, then answer.

        Completed: 200. Failed, cancelled or unknown: 404. Still active (or
        ``action_required``) when the hold ends: 408.
        """
        stats, run_id = self.fake.stats, request.match_info["run_id"]
        stats.result_request_opened(run_id)
        try:
            return await self._result(request)
        finally:
            stats.result_request_closed(run_id)

    async def _result(self, request: web.Request) -> web.Response:
        fake = self.fake
        denied = check_auth(fake, request)
        if denied is not None:
            return denied
        raw_timeout = request.query.get("timeout")
        timeout = DEFAULT_RESULT_TIMEOUT
        if raw_timeout is not None:
            if not _INTEGER.fullmatch(raw_timeout):
                error = {"loc": ["query", "timeout"], "msg": "Input should be a valid integer"}
                return _invalid([{**error, "type": "int_parsing"}], VALIDATION_ERROR)
            timeout = min(max(int(raw_timeout), 0), _MAX_RESULT_TIMEOUT)
        fake.stats.result_timeouts[None if raw_timeout is None else int(raw_timeout)] += 1
        run_id = request.match_info["run_id"]
        record = fake.store.get(run_id)
        if record is None:
            return _not_found(run_id, RESULT_NOT_FOUND)
        if not record.is_terminal:
            cap = fake.max_long_poll
            hold = float(timeout) if cap is None else min(float(timeout), cap)
            if hold > 0:
                fake.stats.result_started()
                try:
                    await fake.store.wait(record, hold)
                finally:
                    fake.stats.result_finished()
        if record.status == "completed":
            return json_response(record.result_body())
        if record.is_terminal:
            detail = {"run_id": run_id, "status": record.status, "error": record.error}
            return error_response(404, RESULT_NOT_FOUND, detail)
        return error_response(408, TIMED_OUT, {"run_id": run_id, "status": record.status})


def build_app(fake: FakeParallel) -> web.Application:
    """A new aiohttp application serving ``fake``."""
    from ._events import RunEventRoutes
    from ._group_routes import GroupRoutes

    @web.middleware
    async def count_in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
        stats = fake.stats
        stats.request_started()
        try:
            return await handler(request)
        finally:
            stats.request_finished()

    async def stop_webhooks(app: web.Application) -> None:
        await fake.webhooks.aclose()

    app = web.Application(middlewares=[count_in_flight])
    app.on_cleanup.append(stop_webhooks)
    TaskRunRoutes(fake).register(app)
    RunEventRoutes(fake).register(app)
    GroupRoutes(fake).register(app)
    return app

"""The task-group resource, mirroring the official SDK's ``client.task_group``.

``add_runs`` takes any number of inputs and sends them in requests of at most 1,000 through the
client-wide create limiter; a lost answer is reconciled against the group's runs, never blindly
re-sent (`_add_runs.AddRunsCall`, which reaches the API only through this resource's
``post_runs``, ``get_runs`` and ``retrieve``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import msgspec

from ._add_runs import MAX_RUNS_PER_ADD, TAG_KEY, AddRunsCall
from ._defaults import RECONCILE_SETTLE
from ._errors import (
    InvalidArgumentError,
)
from ._events import GroupEvent, TaskGroup, TaskGroupRunResponse
from ._models import RUN_STATUSES, Metadata, RunInput, TaskRun, TaskSpec
from ._options import RequestOptions, call_options, request_options
from ._protocol import (
    TASK_RUN_DECODER,
    build_run_input,
    check_metadata,
    convert_task_spec,
    decode,
    encode,
    validate_id,
)
from ._streams import EventStream, group_event_stream, group_runs_stream, stream_read_timeout
from ._transport import Response

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["MAX_RUNS_PER_ADD", "TAG_KEY", "TaskGroupResource"]


log = logging.getLogger("parallel_async")

_CURSORS_KEPT = 256  # groups whose last add_runs cursor we remember

_GROUP_DECODER = msgspec.json.Decoder(TaskGroup)


def _to_run_input(item: object, position: int) -> RunInput:
    if isinstance(item, RunInput):
        return item
    if not isinstance(item, Mapping):
        raise InvalidArgumentError(
            f"inputs[{position}] must be a RunInput or a dict with 'input' and 'processor', "
            f"got {type(item).__name__}"
        )
    try:
        return build_run_input(**item)
    except TypeError as exc:
        raise InvalidArgumentError(f"inputs[{position}]: {exc}") from None
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"inputs[{position}]: {exc}") from None


class TaskGroupResource:
    """``client.task_group``: create groups, add runs in bulk, follow their events.

    Every method also takes the official SDK's per-call ``extra_headers``, ``extra_query``,
    ``extra_body`` (merged into a JSON body) and ``timeout`` (the whole call; streams: `events`).
    """

    __slots__ = ("_client", "_cursors", "_settle")

    def __init__(self, client: AsyncParallel) -> None:
        self._client = client
        self._settle = RECONCILE_SETTLE
        # group -> run_cursor of our latest add answer: later adds' runs all come after it.
        self._cursors: dict[str, str] = {}

    @property
    def reconcile_settle(self) -> float:
        """Seconds ``add_runs`` waits for the runs of an add whose answer was lost (default 60).

        Counted from the moment the answer was lost (the drop, the read timeout, the 5xx):
        the server may still be creating the runs. The inputs that have not shown up in the
        group by then are taken as not created and sent again. Inputs that show up end the
        wait at once, so it is only spent when the request really was not processed. After a
        read timeout (60 s) the server has had two minutes in all.
        """
        return self._settle

    @reconcile_settle.setter
    def reconcile_settle(self, seconds: float) -> None:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            raise InvalidArgumentError(f"reconcile_settle must be seconds >= 0, not {seconds!r}")
        self._settle = float(seconds)

    async def create(
        self,
        *,
        metadata: Metadata | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> TaskGroup:
        """Create an empty task group."""
        body = encode({"metadata": check_metadata(metadata)} if metadata else {})
        options = call_options(extra_headers, extra_query, extra_body, timeout)
        path = "/v1/tasks/groups"  # a group is not a run: not through the create limiter
        resp = await self._client._request(
            "POST", path, body=body, idempotent=False, options=options, timeout=timeout
        )
        return decode(_GROUP_DECODER, resp.status, resp.body)

    async def retrieve(
        self,
        task_group_id: str,
        *,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> TaskGroup:
        """The group's aggregate status (``status.is_active`` False once every run ended)."""
        path = f"/v1/tasks/groups/{validate_id(task_group_id, 'task_group_id')}"
        options = call_options(extra_headers, extra_query, extra_body, timeout)
        resp = await self._client._request("GET", path, options=options, timeout=timeout)
        return decode(_GROUP_DECODER, resp.status, resp.body)

    async def retrieve_run(
        self,
        run_id: str,
        *,
        task_group_id: str,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> TaskRun:
        """A run of the group."""
        group = validate_id(task_group_id, "task_group_id")
        path = f"/v1/tasks/groups/{group}/runs/{validate_id(run_id)}"
        options = call_options(extra_headers, extra_query, extra_body, timeout)
        resp = await self._client._request("GET", path, options=options, timeout=timeout)
        return decode(TASK_RUN_DECODER, resp.status, resp.body)

    async def events(
        self,
        task_group_id: str,
        *,
        last_event_id: str | None = None,
        api_timeout: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> EventStream[GroupEvent]:
        """The group's event stream: status changes and each run's terminal state.

        Resumes from the last ``event_id`` after a disconnect (no event lost or doubled) and
        reconnects when the server ends the stream while runs are still active, unless
        ``api_timeout`` (the server-side bound) ends it. ``timeout`` is the SDK's (httpx) read
        timeout (default and ``None``: 300 s): a connection that brought data and then falls
        silent that long is resumed as dead; one that answered but brings no data that long
        ends the call with `TransportTimeoutError`. The extras go with every (re)connection;
        ``extra_body`` is ignored.
        """
        validate_id(task_group_id, "task_group_id")
        if api_timeout is not None and not api_timeout > 0:
            raise InvalidArgumentError("api_timeout must be a positive number of seconds")
        return group_event_stream(
            self._client,
            task_group_id,
            last_event_id=last_event_id,
            api_timeout=api_timeout,
            read_timeout=stream_read_timeout(timeout),
            options=request_options(extra_headers, extra_query, extra_body),
        )

    async def get_runs(
        self,
        task_group_id: str,
        *,
        include_input: bool = False,
        include_output: bool = False,
        last_event_id: str | None = None,
        status: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> EventStream[GroupEvent]:
        """Every run of the group as ``task_run.state`` events, resumable by ``event_id``.

        ``timeout`` and the extras as for `events`.
        """
        validate_id(task_group_id, "task_group_id")
        if status is not None and status not in RUN_STATUSES:
            raise InvalidArgumentError(f"status must be one of {sorted(RUN_STATUSES)}")
        params = {
            "include_input": "true" if include_input else "false",
            "include_output": "true" if include_output else "false",
        }
        if status is not None:
            params["status"] = status
        return group_runs_stream(
            self._client,
            task_group_id,
            params,
            last_event_id=last_event_id,
            read_timeout=stream_read_timeout(timeout),
            options=request_options(extra_headers, extra_query, extra_body),
        )

    async def add_runs(
        self,
        task_group_id: str,
        *,
        inputs: Iterable[RunInput | Mapping[str, Any]],
        default_task_spec: TaskSpec | Mapping[str, Any] | None = None,
        refresh_status: bool | None = None,
        betas: Sequence[str] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> TaskGroupRunResponse:
        """Add runs to the group, any number of them, in requests of at most 1,000.

        Every input is checked before anything is sent. Bulk requests ask the server not to
        refresh the group status (``refresh_status=false``) except the last, unless you say.
        A lost answer is reconciled against the group's runs, never blindly re-sent.
        Returns one response: all ``run_ids`` in input order, the first batch's cursors and
        the last batch's status.

        The extras go with each batch request (not the reads that reconcile a lost answer).
        When ``timeout`` cuts the call, `AddRunsError` (from a `TransportTimeoutError`) says
        which inputs are runs and which are ``unresolved``.
        """
        group = validate_id(task_group_id, "task_group_id")
        options = call_options(extra_headers, extra_query, extra_body, timeout)
        bodies = [_to_run_input(item, i) for i, item in enumerate(inputs)]
        if not bodies:
            raise InvalidArgumentError("inputs must hold at least one run input")
        spec = None if default_task_spec is None else convert_task_spec(default_task_spec)
        call = AddRunsCall(
            self,
            group,
            bodies,
            spec=spec,
            refresh_status=refresh_status,
            betas=betas,
            options=options,
            settle=self._settle,
            attempts=self._client.retry_policy.attempts,
            cursor=self._cursors.get(group),
            remember=self._remember_cursor,
        )
        return await call.run(timeout)

    def watch_close(self, what: str) -> AbstractContextManager[None]:
        """A block that ends with `ClientClosedError` when the client is closed."""
        return self._client._closing.watch(what)

    async def post_runs(
        self,
        group: str,
        params: dict[str, str],
        body: bytes,
        *,
        betas: Sequence[str] | None,
        deadline: float | None,
        options: RequestOptions | None,
    ) -> Response:
        """One add request (through the create limiter, never repeated once sent)."""
        return await self._client._request(
            "POST",
            f"/v1/tasks/groups/{group}/runs",
            params=params,
            body=body,
            betas=betas,
            idempotent=False,
            is_create=True,
            deadline=deadline,
            options=options,
        )

    def _remember_cursor(self, group: str, cursor: str) -> None:
        self._cursors.pop(group, None)
        self._cursors[group] = cursor
        if len(self._cursors) > _CURSORS_KEPT:
            del self._cursors[next(iter(self._cursors))]

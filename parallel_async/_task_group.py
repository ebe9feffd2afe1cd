"""The task-group resource, mirroring the official SDK's ``client.task_group``.

``add_runs`` takes any number of inputs and sends them in requests of at most 1,000 through the
client-wide create limiter. Its one hard case is the ambiguous add: the connection drops (or a
500/502/504 comes back) after the body was sent, so the runs may or may not exist. Each input we
send carries a tag in its ``metadata`` (key `TAG_KEY`); before re-sending anything we read
the group's runs and keep those already created, so no input is lost and none is created twice.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from ._errors import (
    AddRunsError,
    DecodeError,
    DisconnectedError,
    InternalServerError,
    InvalidArgumentError,
    ParallelError,
    TransportTimeoutError,
)
from ._events import GroupEvent, TaskGroup, TaskGroupRunResponse, TaskRunStateEvent
from ._models import Metadata, RunInput, TaskRun, TaskSpec
from ._protocol import (
    TASK_RUN_DECODER,
    build_run_input,
    check_metadata,
    convert_task_spec,
    decode,
    encode,
    validate_id,
)
from ._streams import EventStream, group_event_stream, group_runs_stream

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["MAX_RUNS_PER_ADD", "TAG_KEY", "TaskGroupResource"]

MAX_RUNS_PER_ADD = 1000
TAG_KEY = "pa_tag"
"""Metadata key that identifies each input of an ``add_runs`` call, to reconcile lost answers."""
RECONCILE_SETTLE = 1.0
"""Seconds between two reads of a group's runs when reconciling a lost add_runs answer."""
RECONCILE_READS = 5
RUN_STATUSES = frozenset(
    {"queued", "action_required", "running", "completed", "failed", "cancelling", "cancelled"}
)

_GROUP_DECODER = msgspec.json.Decoder(TaskGroup)
_ADD_DECODER = msgspec.json.Decoder(TaskGroupRunResponse)


class _AddRunsBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    inputs: list[RunInput]
    default_task_spec: TaskSpec | None = None


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


def _is_ambiguous(exc: ParallelError) -> bool:
    """The request may have been processed: the runs may exist."""
    if isinstance(exc, DisconnectedError | TransportTimeoutError):
        return True
    return isinstance(exc, InternalServerError) and exc.status != 503


class TaskGroupResource:
    """``client.task_group``: create groups, add runs in bulk, follow their events."""

    __slots__ = ("_client",)

    def __init__(self, client: AsyncParallel) -> None:
        self._client = client

    async def create(self, *, metadata: Metadata | None = None) -> TaskGroup:
        """Create an empty task group."""
        body = encode({"metadata": check_metadata(metadata)} if metadata else {})
        resp = await self._client._request(
            "POST", "/v1/tasks/groups", body=body, idempotent=False, is_create=False
        )
        return decode(_GROUP_DECODER, resp.status, resp.body)

    async def retrieve(self, task_group_id: str) -> TaskGroup:
        """The group's aggregate status (``status.is_active`` False once every run ended)."""
        path = f"/v1/tasks/groups/{validate_id(task_group_id, 'task_group_id')}"
        resp = await self._client._request("GET", path)
        return decode(_GROUP_DECODER, resp.status, resp.body)

    async def retrieve_run(self, run_id: str, *, task_group_id: str) -> TaskRun:
        """A run of the group."""
        group = validate_id(task_group_id, "task_group_id")
        path = f"/v1/tasks/groups/{group}/runs/{validate_id(run_id)}"
        resp = await self._client._request("GET", path)
        return decode(TASK_RUN_DECODER, resp.status, resp.body)

    async def events(
        self,
        task_group_id: str,
        *,
        last_event_id: str | None = None,
        api_timeout: float | None = None,
    ) -> EventStream[GroupEvent]:
        """The group's event stream: status changes and each run's terminal state.

        Resumes from the last ``event_id`` after a disconnect (no event lost or doubled) and
        reconnects when the server ends the stream while runs are still active, unless
        ``api_timeout`` bounds it.
        """
        validate_id(task_group_id, "task_group_id")
        if api_timeout is not None and not api_timeout > 0:
            raise InvalidArgumentError("api_timeout must be a positive number of seconds")
        return group_event_stream(
            self._client, task_group_id, last_event_id=last_event_id, api_timeout=api_timeout
        )

    async def get_runs(
        self,
        task_group_id: str,
        *,
        include_input: bool = False,
        include_output: bool = False,
        last_event_id: str | None = None,
        status: str | None = None,
    ) -> EventStream[GroupEvent]:
        """Every run of the group as ``task_run.state`` events, resumable by ``event_id``."""
        validate_id(task_group_id, "task_group_id")
        if status is not None and status not in RUN_STATUSES:
            raise InvalidArgumentError(f"status must be one of {sorted(RUN_STATUSES)}")
        params = {
            "include_input": "true" if include_input else "false",
            "include_output": "true" if include_output else "false",
        }
        if status is not None:
            params["status"] = status
        return group_runs_stream(self._client, task_group_id, params, last_event_id=last_event_id)

    async def add_runs(
        self,
        task_group_id: str,
        *,
        inputs: Iterable[RunInput | Mapping[str, Any]],
        default_task_spec: TaskSpec | Mapping[str, Any] | None = None,
        refresh_status: bool | None = None,
        betas: Sequence[str] | None = None,
    ) -> TaskGroupRunResponse:
        """Add runs to the group, any number of them, in requests of at most 1,000.

        Every input is checked before anything is sent. Bulk requests ask the server not to
        refresh the group status (``refresh_status=false``) except the last, unless you say.
        A lost answer is reconciled against the group's runs, never blindly re-sent.
        Returns one response: all ``run_ids`` in input order, the first batch's cursors and
        the last batch's status.
        """
        group = validate_id(task_group_id, "task_group_id")
        bodies = [_to_run_input(item, i) for i, item in enumerate(inputs)]
        if not bodies:
            raise InvalidArgumentError("inputs must hold at least one run input")
        spec = None if default_task_spec is None else convert_task_spec(default_task_spec)
        nonce = secrets.token_hex(6)
        tagged = [
            msgspec.structs.replace(b, metadata={**(b.metadata or {}), TAG_KEY: f"{nonce}:{i}"})
            for i, b in enumerate(bodies)
        ]
        run_ids: list[str] = []
        size = MAX_RUNS_PER_ADD
        batches = [tagged[i : i + size] for i in range(0, len(tagged), size)]
        answers: list[TaskGroupRunResponse] = []
        for n, batch in enumerate(batches):
            refresh = refresh_status if refresh_status is not None else n == len(batches) - 1
            try:
                answer = await self._add_batch(
                    group, batch, spec=spec, refresh=refresh, betas=betas, nonce=nonce
                )
            except ParallelError as exc:
                if not run_ids and not isinstance(exc, AddRunsError):
                    raise
                # Earlier batches made runs: never let their ids get lost with the error.
                done: list[str | None] = list(run_ids)
                done += exc.run_ids if isinstance(exc, AddRunsError) else [None] * len(batch)
                done += [None] * (len(tagged) - len(done))
                raise AddRunsError(f"adding runs to {group} failed", run_ids=done) from (
                    exc.__cause__ if isinstance(exc, AddRunsError) else exc
                )
            answers.append(answer)
            run_ids.extend(answer.run_ids)
        first, last = answers[0], answers[-1]
        return TaskGroupRunResponse(
            status=last.status,
            run_ids=run_ids,
            run_cursor=first.run_cursor,
            event_cursor=first.event_cursor,
        )

    async def _add_batch(
        self,
        group: str,
        batch: list[RunInput],
        *,
        spec: TaskSpec | None,
        refresh: bool,
        betas: Sequence[str] | None,
        nonce: str,
    ) -> TaskGroupRunResponse:
        path = f"/v1/tasks/groups/{group}/runs"
        params = {"refresh_status": "true" if refresh else "false"}
        pending = batch
        found: dict[str, str] = {}  # tag -> run_id, from reconciliation
        status = None
        last_error: ParallelError | None = None
        for _ in range(self._client.retry_policy.attempts):
            try:
                resp = await self._client._request(
                    "POST",
                    path,
                    params=params,
                    body=encode(_AddRunsBody(inputs=pending, default_task_spec=spec)),
                    betas=betas,
                    idempotent=False,
                    is_create=True,
                )
            except ParallelError as exc:
                if not _is_ambiguous(exc):
                    if found:
                        ids = [found.get(_tag(b)) for b in batch]
                        raise AddRunsError(f"adding runs to {group} failed", run_ids=ids) from exc
                    raise
                last_error = exc
                found.update(await self._created_tags(group, nonce))
                pending = [b for b in batch if _tag(b) not in found]
                if not pending:
                    break
                continue
            answer = decode(_ADD_DECODER, resp.status, resp.body)
            if len(answer.run_ids) != len(pending):
                raise DecodeError(
                    f"add_runs answered {len(answer.run_ids)} run ids for {len(pending)} inputs",
                    status=resp.status,
                    body=resp.body,
                )
            found.update(zip([_tag(b) for b in pending], answer.run_ids, strict=True))
            status = answer
            break
        else:
            ids = [found.get(_tag(b)) for b in batch]
            raise AddRunsError(
                f"could not add {len(pending)} runs to {group} after reconciling",
                run_ids=ids,
            ) from last_error
        if status is None:  # everything was reconciled: read the cursors from the group
            status = TaskGroupRunResponse(
                status=(await self.retrieve(group)).status,
                run_ids=[],
                run_cursor=None,
                event_cursor=None,
            )
        return msgspec.structs.replace(status, run_ids=[found[_tag(b)] for b in batch])

    async def _created_tags(self, group: str, nonce: str) -> dict[str, str]:
        """Tags (of this ``add_runs`` call) of the runs the group holds -> run ids.

        The server may still be processing the request whose answer we lost: read the group
        until two reads, :data:`RECONCILE_SETTLE` seconds apart, agree, so that nothing it is
        about to create gets sent a second time.
        """
        found = await self._tags_once(group, nonce)
        for _ in range(RECONCILE_READS):
            await anyio.sleep(RECONCILE_SETTLE)
            again = await self._tags_once(group, nonce)
            if again == found:
                break
            found = again
        return found

    async def _tags_once(self, group: str, nonce: str) -> dict[str, str]:
        found: dict[str, str] = {}
        async with await self.get_runs(group, include_input=True) as stream:
            async for event in stream:
                if isinstance(event, TaskRunStateEvent) and event.input is not None:
                    tag = (event.input.metadata or {}).get(TAG_KEY)
                    if isinstance(tag, str) and tag.startswith(nonce + ":"):
                        found[tag] = event.run.run_id
        return found


def _tag(body: RunInput) -> str:
    return str((body.metadata or {})[TAG_KEY])

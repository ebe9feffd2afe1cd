"""The task-group resource, mirroring the official SDK's ``client.task_group``.

``add_runs`` takes any number of inputs and sends them in requests of at most 1,000 through the
client-wide create limiter. Its one hard case is the ambiguous add: the connection drops (or a
500/502/504 comes back, or a read timeout) after the body was sent, so the runs may or may not
exist, and the server may still be creating them. Each input we send carries a tag in its
``metadata`` (key `TAG_KEY`); before re-sending anything we read the group's runs (their
``metadata`` names the tag) until every missing input shows up or
`TaskGroupResource.reconcile_settle` seconds pass, and re-send only what is still missing.
After a re-send the group is read once more: runs created twice for one tag (the lost request
finished after the settle period) are reported, since the API cannot cancel a run.
"""

from __future__ import annotations

import logging
import math
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
from ._events import ErrorEvent, GroupEvent, TaskGroup, TaskGroupRunResponse, TaskRunStateEvent
from ._models import RUN_STATUSES, Metadata, RunInput, TaskRun, TaskSpec
from ._options import RequestOptions, call_deadline, call_options, request_options
from ._protocol import (
    TASK_RUN_DECODER,
    build_run_input,
    check_metadata,
    convert_task_spec,
    decode,
    encode,
    validate_id,
)
from ._retry import sleep, transient_failure
from ._streams import EventStream, group_event_stream, group_runs_stream, stream_read_timeout

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["MAX_RUNS_PER_ADD", "TAG_KEY", "TaskGroupResource"]

log = logging.getLogger("parallel_async")

MAX_RUNS_PER_ADD = 1000
TAG_KEY = "pa_tag"
"""Metadata key that identifies each input of an ``add_runs`` call, to reconcile lost answers."""
RECONCILE_SETTLE = 60.0
"""Default `TaskGroupResource.reconcile_settle`, in seconds."""
RECONCILE_READ_ATTEMPTS = 8
"""Reads of a group (each under the client's RetryPolicy) before a lost add is unresolved."""
_POLL_FIRST, _POLL_MAX = 0.25, 5.0  # pauses between reads while waiting for runs to appear
_READ_BACKOFF_FIRST, _READ_BACKOFF_MAX = 1.0, 30.0  # pauses between failed reads
_CURSORS_KEPT = 256  # groups whose last add_runs cursor we remember

_GROUP_DECODER = msgspec.json.Decoder(TaskGroup)
_ADD_DECODER = msgspec.json.Decoder(TaskGroupRunResponse)


class _AddRunsBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    inputs: list[RunInput]
    default_task_spec: TaskSpec | None = None


class _BatchError(Exception):
    """One batch failed for good: what it made is in ``found``, ``unresolved`` is unknown."""

    def __init__(
        self,
        cause: ParallelError,
        found: dict[str, str],
        *,
        unresolved: Iterable[str] = (),
        read_error: ParallelError | None = None,
    ) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.found = found
        self.unresolved = set(unresolved)
        self.read_error = read_error


class _StreamError(ParallelError):
    """A runs stream reported an ``error`` event: that read may have missed runs."""


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
    """The request may have been processed: the runs may exist.

    A 2xx answer that does not decode counts: the server did process that request.
    """
    if isinstance(exc, DisconnectedError | TransportTimeoutError | DecodeError):
        return True
    return isinstance(exc, InternalServerError) and exc.status != 503


def _read_may_pass(exc: ParallelError) -> bool:
    return transient_failure(exc) or isinstance(exc, _StreamError)


class _GroupRuns:
    """The runs of one ``add_runs`` call found in its group, by tag, read by cursor.

    Each read resumes after the last run already read (runs are listed in the order they
    were added), so waiting for runs to appear costs only the new ones. Tags are read from
    each run's ``metadata``, so the inputs are never downloaded.
    """

    __slots__ = ("_cursor", "_group", "_nonce", "_resource", "read_any", "runs")

    def __init__(
        self, resource: TaskGroupResource, group: str, nonce: str, cursor: str | None
    ) -> None:
        self._resource = resource
        self._group = group
        self._nonce = nonce
        self._cursor = cursor
        self.read_any = False
        self.runs: dict[str, list[str]] = {}  # tag -> ids of the runs carrying it, in order

    def start_after(self, cursor: str | None) -> None:
        """Skip the runs before ``cursor`` (those cannot be ours), unless we already read."""
        if cursor is not None and not self.read_any:
            self._cursor = cursor

    async def read(self) -> None:
        """Read the runs added since the last read.

        A failed read (5xx, dropped, timed out: each already retried by the client's
        RetryPolicy) is tried again after a growing pause, up to `RECONCILE_READ_ATTEMPTS`
        reads in all; then its error is raised.
        """
        failures = 0
        while True:
            try:
                await self._read_once()
            except ParallelError as exc:
                failures += 1
                if failures >= RECONCILE_READ_ATTEMPTS or not _read_may_pass(exc):
                    raise
                pause = min(_READ_BACKOFF_FIRST * 2 ** (failures - 1), _READ_BACKOFF_MAX)
                log.debug(
                    "reading the runs of %s failed (%s); again in %.1fs", self._group, exc, pause
                )
            else:
                return
            # Outside the except block: a cancellation while pausing must not carry the
            # read's error as its context.
            with self._resource._client._closing.watch(f"reading the runs of {self._group}"):
                await sleep(pause)

    async def _read_once(self) -> None:
        self.read_any = True
        prefix = self._nonce + ":"
        stream = await self._resource.get_runs(self._group, last_event_id=self._cursor)
        async with stream:
            async for event in stream:
                if isinstance(event, ErrorEvent):
                    raise _StreamError(
                        f"the runs stream of {self._group} reported: {event.error.message}"
                    )
                if not isinstance(event, TaskRunStateEvent):
                    continue
                tag = (event.run.metadata or {}).get(TAG_KEY)
                if isinstance(tag, str) and tag.startswith(prefix):
                    ids = self.runs.setdefault(tag, [])
                    if event.run.run_id not in ids:
                        ids.append(event.run.run_id)
                if event.event_id:
                    self._cursor = event.event_id


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
        nonce = secrets.token_hex(6)
        tags = [f"{nonce}:{i}" for i in range(len(bodies))]
        tagged = [
            msgspec.structs.replace(b, metadata={**(b.metadata or {}), TAG_KEY: tag})
            for b, tag in zip(bodies, tags, strict=True)
        ]
        # Runs of this call can only come after the runs of an add answered before it.
        runs = _GroupRuns(self, group, nonce, self._cursors.get(group))
        ids: dict[str, str] = {}  # tag -> run id
        size = MAX_RUNS_PER_ADD
        batches = [tagged[i : i + size] for i in range(0, len(tagged), size)]
        answers: list[TaskGroupRunResponse | None] = []
        resent = False

        def cut(exc: TransportTimeoutError) -> AddRunsError:  # what the reads saw is known
            ids.update(_seen(runs, set(tags) - ids.keys()))
            unresolved = [i for i, tag in enumerate(tags) if tag not in ids]
            return self._error(str(exc), tags, ids, runs, unresolved)

        with call_deadline(timeout, f"adding runs to {group}", cut) as deadline:
            for n, batch in enumerate(batches):
                refresh = refresh_status if refresh_status is not None else n == len(batches) - 1
                try:
                    answer, found, again = await self._add_batch(
                        group,
                        batch,
                        spec=spec,
                        refresh=refresh,
                        betas=betas,
                        runs=runs,
                        options=options,
                        deadline=deadline,
                    )
                except _BatchError as failed:
                    ids.update(failed.found)
                    message = f"adding runs to {group} failed"
                    if failed.read_error is not None:
                        message += f"; its runs could not be read: {failed.read_error}"
                    unresolved = [i for i, tag in enumerate(tags) if tag in failed.unresolved]
                    raise self._error(message, tags, ids, runs, unresolved) from failed.cause
                except ParallelError as exc:
                    if not ids:  # nothing was created: the plain error
                        raise
                    # Earlier batches made runs: never let their ids get lost with the error.
                    raise self._error(f"adding runs to {group} failed", tags, ids, runs) from exc
                ids.update(found)
                answers.append(answer)
                resent = resent or again
                if answer is not None and answer.run_cursor is not None:
                    runs.start_after(answer.run_cursor)
                    self._remember_cursor(group, answer.run_cursor)
            return await self._finish(group, tags, ids, runs, answers, resent=resent)

    async def _finish(
        self,
        group: str,
        tags: list[str],
        ids: dict[str, str],
        runs: _GroupRuns,
        answers: list[TaskGroupRunResponse | None],
        *,
        resent: bool,
    ) -> TaskGroupRunResponse:
        """Every input is a run: check for runs created twice, then build the answer."""
        if resent:  # did a lost request create runs after its inputs were sent again?
            try:
                await runs.read()
            except ParallelError as exc:
                log.warning("could not check %s for runs created twice: %s", group, exc)
            error = self._error(
                f"added runs to {group}, but some inputs were created twice: a lost request "
                "was processed after they were sent again (the API cannot cancel runs)",
                tags,
                ids,
                runs,
            )
            if error.duplicates:
                log.warning("%s: %s", error, error.duplicates)
                raise error
        first, last = answers[0], answers[-1]
        if last is None:  # the last batch was all reconciled: read the status from the group
            try:
                status = (await self.retrieve(group)).status
            except ParallelError as exc:
                message = f"added runs to {group}, but could not read its status"
                raise self._error(message, tags, ids, runs) from exc
        else:
            status = last.status
        return TaskGroupRunResponse(
            status=status,
            run_ids=[ids[tag] for tag in tags],
            run_cursor=None if first is None else first.run_cursor,
            event_cursor=None if first is None else first.event_cursor,
        )

    def _remember_cursor(self, group: str, cursor: str) -> None:
        self._cursors.pop(group, None)
        self._cursors[group] = cursor
        if len(self._cursors) > _CURSORS_KEPT:
            del self._cursors[next(iter(self._cursors))]

    @staticmethod
    def _error(
        message: str,
        tags: list[str],
        ids: dict[str, str],
        runs: _GroupRuns,
        unresolved: Iterable[int] = (),
    ) -> AddRunsError:
        duplicates = {}
        for i, tag in enumerate(tags):
            kept = ids.get(tag)
            extra = [r for r in runs.runs.get(tag, ()) if kept is not None and r != kept]
            if extra:
                duplicates[i] = extra
        return AddRunsError(
            message,
            run_ids=[ids.get(tag) for tag in tags],
            tags=tags,
            unresolved=unresolved,
            duplicates=duplicates,
        )

    async def _add_batch(
        self,
        group: str,
        batch: list[RunInput],
        *,
        spec: TaskSpec | None,
        refresh: bool,
        betas: Sequence[str] | None,
        runs: _GroupRuns,
        options: RequestOptions | None = None,
        deadline: float | None = None,
    ) -> tuple[TaskGroupRunResponse | None, dict[str, str], bool]:
        """Add one batch: its answer (None if reconciled), tag -> run id, and whether a
        request was sent again after a lost answer. Raises `_BatchError` once anything of
        the batch is known or unknown, the plain error while nothing was created."""
        path = f"/v1/tasks/groups/{group}/runs"
        params = {"refresh_status": "true" if refresh else "false"}
        pending = batch
        found: dict[str, str] = {}  # tag -> run_id
        lost: ParallelError | None = None
        resent = False
        for _ in range(self._client.retry_policy.attempts):
            resent = resent or lost is not None
            try:
                resp = await self._client._request(
                    "POST",
                    path,
                    params=params,
                    body=encode(_AddRunsBody(inputs=pending, default_task_spec=spec)),
                    betas=betas,
                    idempotent=False,
                    is_create=True,
                    deadline=deadline,
                    options=options,
                )
                answer = decode(_ADD_DECODER, resp.status, resp.body)
                if len(answer.run_ids) != len(pending):
                    raise DecodeError(
                        f"add_runs answered {len(answer.run_ids)} run ids for {len(pending)} "
                        "inputs",
                        status=resp.status,
                        body=resp.body,
                    )
            except ParallelError as exc:
                if not _is_ambiguous(exc):
                    if found:
                        raise _BatchError(exc, found) from exc
                    raise
                lost = exc
            else:
                found.update(zip([_tag(b) for b in pending], answer.run_ids, strict=True))
                return answer, found, resent
            # The answer was lost: read the group for the runs. Outside the except block, so
            # that a cancellation while reading does not carry the lost answer as its context.
            wanted = {_tag(b) for b in pending}
            try:
                await self._settle_runs(runs, wanted)
            except ParallelError as read_error:
                found.update(_seen(runs, wanted))  # what the reads did see is known
                unknown = wanted - found.keys()
                raise _BatchError(lost, found, unresolved=unknown, read_error=read_error) from lost
            found.update(_seen(runs, wanted))
            pending = [b for b in pending if _tag(b) not in found]
            if not pending:
                return None, found, resent
        assert lost is not None  # noqa: S101 - the loop only ends after a lost answer
        raise _BatchError(lost, found)

    async def _settle_runs(self, runs: _GroupRuns, wanted: set[str]) -> None:
        """Read the group until every ``wanted`` tag has a run, or until a read that started
        `reconcile_settle` seconds after now found the rest still missing."""
        until = anyio.current_time() + self._settle
        pause = _POLL_FIRST
        while True:
            started = anyio.current_time()
            await runs.read()
            if wanted <= runs.runs.keys() or started >= until:
                return
            with self._client._closing.watch("reconciling an add_runs"):
                await anyio.sleep(max(0.0, min(pause, until - anyio.current_time())))
            pause = min(pause * 2, _POLL_MAX)


def _seen(runs: _GroupRuns, tags: set[str]) -> dict[str, str]:
    """Tag -> the first run seen carrying it, for the ``tags`` the reads found."""
    return {tag: runs.runs[tag][0] for tag in tags if tag in runs.runs}


def _tag(body: RunInput) -> str:
    return str((body.metadata or {})[TAG_KEY])

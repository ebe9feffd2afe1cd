"""One ``add_runs`` call: batches of at most 1,000, and the reconciliation of a lost answer.

Its one hard case is the ambiguous add: the connection drops (or a 500/502/504 comes back, or a
read timeout) after the body was sent, so the runs may or may not exist, and the server may still
be creating them. Each input we send carries a tag in its ``metadata`` (key `TAG_KEY`); before
re-sending anything we read the group's runs (their ``metadata`` names the tag) until every
missing input shows up or the settle period passes, and re-send only what is still missing.
After a re-send the group is read once more: runs created twice for one tag (the lost request
finished after the settle period) are reported, since the API cannot cancel a run.

`AddRunsCall` talks to the API only through `GroupEndpoints` (post a batch, list a group's
runs, read its status): the task-group resource provides them.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import anyio
import msgspec

from ._backoff import backoff
from ._defaults import RECONCILE_READ_ATTEMPTS
from ._errors import (
    AddRunsError,
    BatchError,
    DecodeError,
    DisconnectedError,
    InternalServerError,
    ParallelError,
    StreamReadError,
    TransportTimeoutError,
)
from ._events import ErrorEvent, GroupEvent, TaskGroup, TaskGroupRunResponse, TaskRunStateEvent
from ._models import RunInput, TaskSpec
from ._options import RequestOptions, call_deadline
from ._protocol import decode, encode
from ._retry import sleep, transient_failure
from ._streams import EventStream
from ._transport import Response

__all__ = ["MAX_RUNS_PER_ADD", "TAG_KEY", "AddRunsCall", "GroupEndpoints"]

log = logging.getLogger("parallel_async")


class GroupEndpoints(Protocol):
    """What an add needs from the API."""

    async def post_runs(
        self,
        group: str,
        params: dict[str, str],
        body: bytes,
        *,
        betas: Sequence[str] | None,
        deadline: float | None,
        options: RequestOptions | None,
    ) -> Response: ...

    async def get_runs(
        self, task_group_id: str, *, last_event_id: str | None = None
    ) -> EventStream[GroupEvent]: ...

    async def retrieve(self, task_group_id: str) -> TaskGroup: ...

    def watch_close(self, what: str) -> AbstractContextManager[None]: ...


MAX_RUNS_PER_ADD = 1000
TAG_KEY = "pa_tag"
"""Metadata key that identifies each input of an ``add_runs`` call, to reconcile lost answers."""
_POLL_FIRST, _POLL_MAX = 0.25, 5.0  # pauses between reads while waiting for runs to appear
_READ_BACKOFF_FIRST, _READ_BACKOFF_MAX = 1.0, 30.0  # pauses between failed reads

_GROUP_DECODER = msgspec.json.Decoder(TaskGroup)
_ADD_DECODER = msgspec.json.Decoder(TaskGroupRunResponse)


class _AddRunsBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    inputs: list[RunInput]
    default_task_spec: TaskSpec | None = None


def _is_ambiguous(exc: ParallelError) -> bool:
    """The request may have been processed: the runs may exist.

    A 2xx answer that does not decode counts: the server did process that request.
    """
    if isinstance(exc, DisconnectedError | TransportTimeoutError | DecodeError):
        return True
    return isinstance(exc, InternalServerError) and exc.status != 503


def _read_may_pass(exc: ParallelError) -> bool:
    return transient_failure(exc) or isinstance(exc, StreamReadError)


class _GroupRuns:
    """The runs of one ``add_runs`` call found in its group, by tag, read by cursor.

    Each read resumes after the last run already read (runs are listed in the order they
    were added), so waiting for runs to appear costs only the new ones. Tags are read from
    each run's ``metadata``, so the inputs are never downloaded.
    """

    __slots__ = ("_cursor", "_group", "_nonce", "_resource", "read_any", "runs")

    def __init__(self, api: GroupEndpoints, group: str, nonce: str, cursor: str | None) -> None:
        self._resource = api
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
                pause = backoff(failures - 1, first=_READ_BACKOFF_FIRST, cap=_READ_BACKOFF_MAX)
                log.debug(
                    "reading the runs of %s failed (%s); again in %.1fs", self._group, exc, pause
                )
            else:
                return
            # Outside the except block: a cancellation while pausing must not carry the
            # read's error as its context.
            with self._resource.watch_close(f"reading the runs of {self._group}"):
                await sleep(pause)

    async def _read_once(self) -> None:
        self.read_any = True
        prefix = self._nonce + ":"
        stream = await self._resource.get_runs(self._group, last_event_id=self._cursor)
        async with stream:
            async for event in stream:
                if isinstance(event, ErrorEvent):
                    raise StreamReadError(
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


class AddRunsCall:
    """One ``add_runs`` call, checked inputs in hand."""

    def __init__(
        self,
        api: GroupEndpoints,
        group: str,
        bodies: list[RunInput],
        *,
        spec: TaskSpec | None,
        refresh_status: bool | None,
        betas: Sequence[str] | None,
        options: RequestOptions | None,
        settle: float,
        attempts: int,
        cursor: str | None,
        remember: Callable[[str, str], None],
    ) -> None:
        self._api = api
        self._group = group
        self._bodies = bodies
        self._spec = spec
        self._refresh_status = refresh_status
        self._betas = betas
        self._options = options
        self._settle = settle
        self._attempts = attempts
        self._cursor = cursor
        self._remember = remember

    async def run(self, timeout: float | None) -> TaskGroupRunResponse:
        """Send every batch; reconcile lost answers; one response for the whole call."""
        group = self._group
        bodies = self._bodies
        refresh_status = self._refresh_status
        nonce = secrets.token_hex(6)
        tags = [f"{nonce}:{i}" for i in range(len(bodies))]
        tagged = [
            msgspec.structs.replace(b, metadata={**(b.metadata or {}), TAG_KEY: tag})
            for b, tag in zip(bodies, tags, strict=True)
        ]
        # Runs of this call can only come after the runs of an add answered before it.
        runs = _GroupRuns(self._api, group, nonce, self._cursor)
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
                        batch, refresh=refresh, runs=runs, deadline=deadline
                    )
                except BatchError as failed:
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
                    self._remember(group, answer.run_cursor)
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
                status = (await self._api.retrieve(group)).status
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
        batch: list[RunInput],
        *,
        refresh: bool,
        runs: _GroupRuns,
        deadline: float | None = None,
    ) -> tuple[TaskGroupRunResponse | None, dict[str, str], bool]:
        """Add one batch: its answer (None if reconciled), tag -> run id, and whether a
        request was sent again after a lost answer. Raises `BatchError` once anything of
        the batch is known or unknown, the plain error while nothing was created."""
        params = {"refresh_status": "true" if refresh else "false"}
        pending = batch
        found: dict[str, str] = {}  # tag -> run_id
        lost: ParallelError | None = None
        resent = False
        for _ in range(self._attempts):
            resent = resent or lost is not None
            try:
                resp = await self._api.post_runs(
                    self._group,
                    params,
                    encode(_AddRunsBody(inputs=pending, default_task_spec=self._spec)),
                    betas=self._betas,
                    deadline=deadline,
                    options=self._options,
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
                        raise BatchError(exc, found) from exc
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
                raise BatchError(lost, found, unresolved=unknown, read_error=read_error) from lost
            found.update(_seen(runs, wanted))
            pending = [b for b in pending if _tag(b) not in found]
            if not pending:
                return None, found, resent
        assert lost is not None  # noqa: S101 - the loop only ends after a lost answer
        raise BatchError(lost, found)

    async def _settle_runs(self, runs: _GroupRuns, wanted: set[str]) -> None:
        """Read the group until every ``wanted`` tag has a run, or until a read that started
        `reconcile_settle` seconds after now found the rest still missing."""
        until = anyio.current_time() + self._settle
        reads = 0
        while True:
            started = anyio.current_time()
            await runs.read()
            if wanted <= runs.runs.keys() or started >= until:
                return
            pause = backoff(reads, first=_POLL_FIRST, cap=_POLL_MAX)
            with self._api.watch_close("reconciling an add_runs"):
                await anyio.sleep(max(0.0, min(pause, until - anyio.current_time())))
            reads += 1


def _seen(runs: _GroupRuns, tags: set[str]) -> dict[str, str]:
    """Tag -> the first run seen carrying it, for the ``tags`` the reads found."""
    return {tag: runs.runs[tag][0] for tag in tags if tag in runs.runs}


def _tag(body: RunInput) -> str:
    return str((body.metadata or {})[TAG_KEY])

"""Enrichment on a cluster: what the driver plans and what each task attempt does.

The driver (`plan_job`, `create_groups`) checks the arguments, creates one task group per
partition before the job starts, and hands every task a `ClusterPlan`. A task attempt
(`partition_job`) then:

1. begins its partition at the job's coordinator (``_cluster_limit``): an earlier attempt of the
   same partition is superseded, and this one waits until the creates granted to it have had
   ``settle`` seconds to land;
2. lists its partition's task group and adopts the runs of its partition there (each carries
   its row key in ``metadata["pa_row"]`` and its partition in ``metadata["pa_part"]``),
   writing them to a private, temporary journal;
3. runs the ordinary enrichment engine (``client.enrich``) on its rows with that journal: rows
   whose key has a run are answered by it, only the others are created, in adds of up to 1,000
   through the job's shared create budget.

So the state that makes a re-run task safe is the API's own (the group's runs); the journal is
only this attempt's working copy and is deleted at its end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pathlib
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import msgspec

from ._client import AsyncParallel
from ._cluster_limit import CoordinatorLink, SharedCreateLimiter, Unit, check_rate, counting
from ._enrich import DEFAULT_WINDOW, Enrichment, _primary
from ._enrich_runs import run_identity
from ._errors import AddRunsError, ClusterError, InvalidArgumentError, ParallelError
from ._events import ErrorEvent, TaskGroupRunResponse, TaskRunStateEvent
from ._fields import OutputSpec, job_fingerprint, output_spec
from ._frames import check_clashes
from ._journal import Journal
from ._models import RunInput, TaskRunJsonOutput, TaskRunTextOutput, TaskSpec
from ._task_group import MAX_RUNS_PER_ADD, TaskGroupResource

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "DEFAULT_WINDOW",
    "ClusterPlan",
    "create_groups",
    "partition_job",
    "plan_job",
    "run_blocking",
]

log = logging.getLogger("parallel_async")

T = TypeVar("T")

PARTITION_METADATA = "pa_part"
"""Run metadata key: the partition that created the run (a task adopts only its own)."""
_ADOPT_BATCH = 500  # listed runs written to the attempt's journal at once
_GROUP_CREATES_AT_ONCE = 16
_ENCODER = msgspec.json.Encoder()


class ClusterPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a task needs to enrich its partition (sent to every task; no secret).

    Attributes:
        schema: the compiled output schema (`OutputSpec.schema`).
        processor: the processor of every run.
        fingerprint: `job_fingerprint` of the question: salts every row key.
        columns: the input columns of each run (``None``: all).
        key: the column naming each row (``None``: its content).
        timeout: seconds each task attempt waits for its runs.
        groups: the task groups, one per partition (partition ``p`` uses ``p % len``).
        settle: seconds an unanswered create may take to show up in its group.
        chunk: most runs per create request.
        max_in_flight: most requests a task has open at once.
        window: most rows a task reads ahead of the oldest one not yet written out.
    """

    schema: dict[str, Any]
    processor: str
    fingerprint: str
    columns: tuple[str, ...] | None
    key: str | None
    timeout: float | None
    groups: tuple[str, ...] = ()
    settle: float
    chunk: int
    max_in_flight: int
    window: int

    def group(self, partition: int) -> str:
        """The task group of ``partition``."""
        if not self.groups:
            raise ClusterError("the job has no task groups: create them with create_groups")
        return self.groups[partition % len(self.groups)]


def plan_job(
    frame_columns: Sequence[str],
    *,
    output: Any,
    processor: str,
    columns: Sequence[str] | None,
    key: str | None,
    timeout: float | None,
    create_rate_limit: int,
    create_rate_window: float,
    create_rate_unit: Unit,
    reconcile_settle: float,
    max_in_flight: int,
    window: int = DEFAULT_WINDOW,
) -> tuple[OutputSpec, ClusterPlan]:
    """Check a cluster enrichment's arguments (before anything is sent) and plan it.

    Raises:
        InvalidArgumentError: what to fix (`FieldSpecError` for a bad field syntax).
    """
    spec = output_spec(output)
    if not isinstance(processor, str) or not processor:
        raise InvalidArgumentError(f"processor must be a name like 'base', got {processor!r}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
    ):
        raise InvalidArgumentError("timeout must be a positive number of seconds or None")
    for name, value in (("max_in_flight", max_in_flight), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
    check_rate(create_rate_limit, create_rate_window, create_rate_unit, reconcile_settle)
    if columns is not None:
        if isinstance(columns, str) or not all(isinstance(c, str) and c for c in columns):
            raise InvalidArgumentError("columns must be a list of column names")
        columns = tuple(columns)
        if not columns:
            raise InvalidArgumentError("columns must name at least one column")
    if key is not None and (not isinstance(key, str) or not key):
        raise InvalidArgumentError("key must be a column name")
    names = [str(c) for c in frame_columns]
    check_clashes(names, spec)
    missing = [c for c in (*(columns or ()), *([key] if key else [])) if c not in names]
    if missing:
        raise InvalidArgumentError(f"the DataFrame has no column(s) {', '.join(missing)}")
    chunk = MAX_RUNS_PER_ADD
    if create_rate_unit == "runs":
        chunk = min(chunk, create_rate_limit)
    plan = ClusterPlan(
        schema=spec.schema,
        processor=processor,
        fingerprint=job_fingerprint(spec, processor, columns),
        columns=columns,
        key=key,
        timeout=None if timeout is None else float(timeout),
        settle=float(reconcile_settle),
        chunk=chunk,
        max_in_flight=max_in_flight,
        window=window,
    )
    return spec, plan


def run_blocking(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` to its end, also where an event loop is already running (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(fn)
    with concurrent.futures.ThreadPoolExecutor(1, "parallel-async cluster") as pool:
        return pool.submit(anyio.run, fn).result()


def create_groups(plan: ClusterPlan, count: int) -> ClusterPlan:
    """Create ``count`` task groups (one per partition) on the driver; the plan with them.

    The key and base URL come from the environment, as on the workers.
    """
    if count < 1:
        raise InvalidArgumentError("the DataFrame has no partitions")

    async def main() -> tuple[str, ...]:
        ids: list[str] = [""] * count
        slots = anyio.Semaphore(_GROUP_CREATES_AT_ONCE)
        async with AsyncParallel(max_in_flight=_GROUP_CREATES_AT_ONCE) as client:

            async def one(partition: int) -> None:
                async with slots:
                    metadata: dict[str, str | int | float | bool] = {
                        "pa_job": plan.fingerprint,
                        "pa_part": partition,
                    }
                    group = await client.task_group.create(metadata=metadata)
                    ids[partition] = group.taskgroup_id

            async with anyio.create_task_group() as tg:
                for partition in range(count):
                    tg.start_soon(one, partition)
        return tuple(ids)

    groups = run_blocking(main)
    log.info("created %d task groups for job %s", count, plan.fingerprint)
    return msgspec.structs.replace(plan, groups=groups)


# --- a task attempt ------------------------------------------------------------------------------


class _BudgetedGroups(TaskGroupResource):
    """``task_group`` whose adds are split to the job's request size, count their runs
    against the shared budget, tell the coordinator once answered, and tag each run with
    its partition."""

    __slots__ = ("_chunk", "_partition", "_release")

    def __init__(
        self,
        client: AsyncParallel,
        chunk: int,
        partition: int,
        release: Callable[[list[int]], Awaitable[None]],
    ) -> None:
        super().__init__(client)
        self._chunk = chunk
        self._partition = partition
        self._release = release

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
        """`TaskGroupResource.add_runs`, one request of at most ``chunk`` runs at a time."""
        items = [self._tagged(item) for item in inputs]
        ids: list[str | None] = []
        first: TaskGroupRunResponse | None = None
        last: TaskGroupRunResponse | None = None
        for start in range(0, max(len(items), 1), self._chunk):
            part = items[start : start + self._chunk]
            with counting(len(part)) as grants:
                try:
                    answer = await super().add_runs(
                        task_group_id,
                        inputs=part,
                        default_task_spec=default_task_spec,
                        refresh_status=refresh_status,
                        betas=betas,
                        extra_headers=extra_headers,
                        extra_query=extra_query,
                        extra_body=extra_body,
                        timeout=timeout,
                    )
                except AddRunsError as exc:
                    if start == 0 and len(part) == len(items):
                        raise
                    rest = [None] * (len(items) - start - len(part))
                    raise AddRunsError(
                        f"adding runs to {task_group_id} failed",
                        run_ids=[*ids, *exc.run_ids, *rest],
                        unresolved=[start + i for i in exc.unresolved],
                    ) from exc
                except ParallelError as exc:
                    if not ids:
                        raise
                    raise AddRunsError(
                        f"adding runs to {task_group_id} failed",
                        run_ids=[*ids, *([None] * (len(items) - start))],
                    ) from exc
            await self._release(grants)
            ids.extend(answer.run_ids)
            first = first or answer
            last = answer
        assert first is not None  # noqa: S101 - one chunk at least
        assert last is not None  # noqa: S101
        return TaskGroupRunResponse(
            status=last.status,
            run_ids=[i for i in ids if i is not None],
            run_cursor=first.run_cursor,
            event_cursor=first.event_cursor,
        )

    def _tagged(self, item: RunInput | Mapping[str, Any]) -> RunInput | Mapping[str, Any]:
        if isinstance(item, RunInput):
            metadata = {**(item.metadata or {}), PARTITION_METADATA: self._partition}
            return msgspec.structs.replace(item, metadata=metadata)
        if isinstance(item, Mapping):
            metadata = {**(item.get("metadata") or {}), PARTITION_METADATA: self._partition}
            return {**item, "metadata": metadata}
        return item  # refused by add_runs, with its position


class _WorkerClient(AsyncParallel):
    """The client of one task attempt: key and base URL from the environment, creates
    through the job's coordinator."""

    def __init__(
        self,
        plan: ClusterPlan,
        partition: int,
        limiter: SharedCreateLimiter,
        release: Callable[[list[int]], Awaitable[None]],
    ) -> None:
        super().__init__(max_in_flight=plan.max_in_flight, create_rate_limit=None)
        self._create_limiter = limiter
        self.task_group = _BudgetedGroups(self, plan.chunk, partition, release)
        self.task_group.reconcile_settle = plan.settle


@asynccontextmanager
async def partition_job(
    plan: ClusterPlan,
    partition: int,
    link: CoordinatorLink,
    *,
    token: str | None = None,
    begun: float | None = None,
) -> AsyncIterator[Callable[[Any], Enrichment]]:
    """One attempt at ``partition``: yields ``start(records)``, the `Enrichment` of its rows.

    Args:
        plan: the job's plan.
        partition: the partition's number (its task group is ``plan.group(partition)``).
        link: the job's coordinator.
        token: this attempt's token (new one by default).
        begun: seconds to wait, when the caller already began the partition with ``token``.
    """
    token = token or secrets.token_hex(8)
    wait = await link.begin(partition, token) if begun is None else begun
    if wait > 0:
        log.info(
            "partition %d: waiting %.1f s for the creates of an earlier attempt to land",
            partition,
            wait,
        )
        await anyio.sleep(wait)
    limiter = SharedCreateLimiter(link, partition, token)

    async def release(grants: list[int]) -> None:
        if grants:
            await link.release(partition, token, grants)

    tmpdir = tempfile.mkdtemp(prefix="parallel-async-partition-")
    try:
        async with _WorkerClient(plan, partition, limiter, release) as client:
            path = pathlib.Path(tmpdir) / "journal.sqlite3"
            await _adopt(client, plan, plan.group(partition), path, partition)

            def start(records: Any) -> Enrichment:
                return client.enrich(
                    records,
                    output=plan.schema,
                    processor=plan.processor,
                    journal=path,
                    columns=plan.columns,
                    key=plan.key,
                    timeout=plan.timeout,
                    window=plan.window,
                )

            try:
                yield start
            except BaseExceptionGroup as group:  # the engine's task group: its real error
                error = _primary(group)
                raise error from error.__cause__
    finally:
        await limiter.aclose()
        shutil.rmtree(tmpdir, ignore_errors=True)


async def _adopt(
    client: AsyncParallel, plan: ClusterPlan, group: str, path: pathlib.Path, partition: int
) -> None:
    """Write the runs ``partition`` made in ``group`` into a new journal at ``path``."""
    fp = plan.fingerprint
    journal = await Journal.open(path)
    seen: set[str] = set()
    extra = 0
    try:
        await journal.job(
            fp,
            processor=plan.processor,
            schema=plan.schema,
            columns=plan.columns,
            key_column=plan.key,
        )
        await journal.set_group(fp, group)
        batch: list[tuple[str, int, TaskRunStateEvent]] = []
        stream = await client.task_group.get_runs(group, include_output=True)
        async with stream:
            async for event in stream:
                if isinstance(event, ErrorEvent):
                    raise ClusterError(
                        f"listing the runs of {group} failed ({event.error.message}): "
                        "no run is created without a complete listing"
                    )
                if not isinstance(event, TaskRunStateEvent):
                    continue
                row, attempt = run_identity(event.run)
                if not row or (event.run.metadata or {}).get(PARTITION_METADATA) != partition:
                    continue  # not a run of this partition's rows
                if row in seen:
                    extra += 1
                    continue
                seen.add(row)
                batch.append((row, attempt, event))
                if len(batch) >= _ADOPT_BATCH:
                    await _record(journal, fp, batch)
                    batch = []
        if batch:
            await _record(journal, fp, batch)
        await journal.flush()
    finally:
        await journal.close()
    if seen:
        log.info("partition %d: adopted %d runs from %s", partition, len(seen), group)
    if extra:
        log.warning("partition %d: %s holds %d extra runs of its rows", partition, group, extra)


async def _record(
    journal: Journal, fp: str, batch: list[tuple[str, int, TaskRunStateEvent]]
) -> None:
    """Journal listed runs: each as running, and with its outcome once it has one."""
    await journal.write_intents(fp, [(row, attempt) for row, attempt, _ in batch], time.time())
    journal.record_runs(fp, [(row, event.run.run_id) for row, _, event in batch])
    outcomes: list[tuple[str, str, str | None, str | None, str]] = []
    for row, _, event in batch:
        run, output = event.run, event.output
        if run.status == "completed" and output is not None:
            basis = _ENCODER.encode(output.basis).decode() if output.basis else None
            if isinstance(output, TaskRunJsonOutput):
                content = _ENCODER.encode(output.content).decode()
                outcomes.append((row, "completed", content, basis, ""))
            elif isinstance(output, TaskRunTextOutput):
                outcomes.append((row, "completed", "{}", basis, "the run answered text"))
        elif run.status in ("failed", "cancelled"):
            reason = run.error.message if run.error is not None and run.error.message else None
            outcomes.append((row, "failed", None, None, reason or f"the run was {run.status}"))
    if outcomes:
        journal.record_outcomes(fp, outcomes)

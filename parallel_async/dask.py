"""Enrichment of a Dask DataFrame: ``parallel_async.dask.enrich(ddf, output=..., ...)``.

Needs the ``dask`` extra (``pip install 'parallel-async[dask]'``: dask[dataframe] and
distributed) and a ``dask.distributed`` client. See the Dask page of the docs for the guarantee
(one run per row, even when a worker dies mid-job) and what it assumes.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

import anyio

from ._cluster import DEFAULT_WINDOW, ClusterPlan, create_groups, partition_job, plan_job
from ._cluster_limit import Coordinator, Grant, Unit
from ._errors import ClusterError, InvalidArgumentError, MissingDependencyError, ParallelError
from ._frames import FrameBuilder

__all__ = ["CreateCoordinator", "enrich"]


class CreateCoordinator:
    """The Dask actor holding a job's `Coordinator`: its create budget and partition owners.

    One per `enrich` call, on one worker; every task of the job calls it before each create
    request. Its methods run one at a time (Dask runs an actor's calls on one thread).
    """

    def __init__(self, limit: int, window: float, unit: Unit, settle: float) -> None:
        self._coordinator = Coordinator(limit, window, unit, settle)

    def begin(self, partition: int, token: str) -> float:
        """See `Coordinator.begin`."""
        return self._coordinator.begin(partition, token, time.monotonic())

    def acquire(self, partition: int, token: str, runs: int) -> Grant:
        """See `Coordinator.acquire`."""
        return self._coordinator.acquire(partition, token, runs, time.monotonic())

    def release(self, partition: int, token: str, grants: list[int]) -> None:
        """See `Coordinator.release`."""
        self._coordinator.release(partition, token, grants)

    def pause(self, seconds: float) -> None:
        """See `Coordinator.pause`."""
        self._coordinator.pause(seconds, time.monotonic())

    def stats(self) -> dict[str, int]:
        """What it granted: attempts, requests, runs, waits, pauses, superseded."""
        return dict(self._coordinator.stats)


class _ActorLink:
    """A task's link to the job's actor. Calls block, so they run on a worker thread."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    async def _call(self, name: str, *args: Any) -> Any:
        def call() -> Any:
            return getattr(self._actor, name)(*args).result()

        try:
            return await anyio.to_thread.run_sync(call)
        except ParallelError:
            raise
        except Exception as exc:
            raise ClusterError(f"the job's coordinator actor cannot be reached: {exc}") from exc

    async def begin(self, partition: int, token: str) -> float:
        return float(await self._call("begin", partition, token))

    async def acquire(self, partition: int, token: str, runs: int) -> Grant:
        state, wait, grant = await self._call("acquire", partition, token, runs)
        return str(state), float(wait), int(grant)

    async def release(self, partition: int, token: str, grants: list[int]) -> None:
        await self._call("release", partition, token, grants)

    async def pause(self, seconds: float) -> None:
        await self._call("pause", seconds)


def _enrich_partition(
    frame: Any, plan: ClusterPlan, actor: Any, partition_info: dict[str, Any] | None = None
) -> Any:
    """One Dask task: the partition (a pandas DataFrame) with its output columns."""
    if len(frame) == 0:
        return FrameBuilder(frame, "pandas", _spec(plan)).build()
    partition = int(partition_info["number"]) if partition_info else 0
    token = secrets.token_hex(8)
    try:
        # On the task's own thread: binds the actor proxy to this worker, so the calls made
        # later from other threads reach it too.
        wait = float(actor.begin(partition, token).result())
    except Exception as exc:
        raise ClusterError(f"the job's coordinator actor cannot be reached: {exc}") from exc

    async def main() -> Any:
        link = _ActorLink(actor)
        async with partition_job(plan, partition, link, token=token, begun=wait) as start:
            return await start(frame)

    return anyio.run(main)


def _spec(plan: ClusterPlan) -> Any:
    from ._fields import output_spec

    return output_spec(plan.schema)


_ACTORS: dict[str, Any] = {}  # job -> the actor's future: held so the actor outlives the call
_ACTORS_LOCK = threading.Lock()


def enrich(
    ddf: Any,
    *,
    output: Any,
    processor: str,
    columns: Sequence[str] | None = None,
    key: str | None = None,
    timeout: float | None = None,
    create_rate_limit: int = 2000,
    create_rate_window: float = 60.0,
    create_rate_unit: Unit = "requests",
    reconcile_settle: float = 60.0,
    max_in_flight: int = 100,
    window: int = DEFAULT_WINDOW,
    client: Any = None,
) -> Any:
    """Enrich a Dask DataFrame: one run per row, each row answered once.

    Returns a new (lazy) Dask DataFrame, partition by partition what ``client.enrich`` gives
    for a pandas DataFrame: the same rows and index, the input columns unchanged, then one
    typed column per output field, then ``_status``, ``_error`` and ``_run_id``. Each
    partition's runs live in a task group created here, before the job; a task Dask runs
    again (its worker died) adopts the runs its group already holds for its rows and creates
    only the missing ones. One actor holds the job's create budget for every worker.

    The client process and every worker read ``PARALLEL_API_KEY`` (and
    ``PARALLEL_BASE_URL``) from their environment.

    Args:
        ddf: the Dask DataFrame.
        output: what to find for each row (a Struct type, a JSON Schema, the field syntax
            ``"ceo, founded int: year founded"``: see ``client.enrich``).
        processor: the processor of every run.
        columns: the columns that go into each run's input (default: all).
        key: a column naming each row; default: the row's content (of ``columns``).
        timeout: seconds each task waits for its runs; rows still running then come out with
            ``_status`` ``running`` (computing the DataFrame again picks them up).
        create_rate_limit: create requests (or runs) allowed per ``create_rate_window``
            seconds for the whole job, every worker together.
        create_rate_window: the window of ``create_rate_limit``, seconds.
        create_rate_unit: ``"requests"`` (an add of up to 1,000 runs counts once) or
            ``"runs"`` (each run counts; adds then hold at most ``create_rate_limit`` runs).
        reconcile_settle: seconds a create whose answer was lost (a worker died mid-request)
            may take to show up in its group; a re-run task waits for it before listing.
        max_in_flight: most requests each task has open at once.
        window: most rows a task reads ahead of the oldest one not yet answered.
        client: the ``distributed.Client`` (default: the current one).

    Raises:
        InvalidArgumentError: a bad argument, or no distributed client, before anything is
            sent.
        MissingDependencyError: dask or distributed is not installed.
    """
    try:
        import dask.dataframe
        import distributed
    except ImportError as exc:
        raise MissingDependencyError(
            f"parallel_async.dask needs dask[dataframe] and distributed ({exc.name} is "
            "missing): pip install 'parallel-async[dask]'"
        ) from None
    if not isinstance(ddf, dask.dataframe.DataFrame):
        raise InvalidArgumentError(f"ddf must be a Dask DataFrame, got {type(ddf).__name__}")
    if client is None:
        try:
            client = distributed.get_client()
        except ValueError:
            raise InvalidArgumentError(
                "parallel_async.dask.enrich needs a dask.distributed Client (its actor holds "
                "the job's rate limit): create one first, e.g. Client(LocalCluster())"
            ) from None
    spec, plan = plan_job(
        list(ddf.columns),
        output=output,
        processor=processor,
        columns=columns,
        key=key,
        timeout=timeout,
        create_rate_limit=create_rate_limit,
        create_rate_window=create_rate_window,
        create_rate_unit=create_rate_unit,
        reconcile_settle=reconcile_settle,
        max_in_flight=max_in_flight,
        window=window,
    )
    plan = create_groups(plan, ddf.npartitions)
    future = client.submit(
        CreateCoordinator,
        create_rate_limit,
        create_rate_window,
        create_rate_unit,
        reconcile_settle,
        actor=True,
        pure=False,
    )
    actor = future.result()
    with _ACTORS_LOCK:
        _ACTORS[plan.fingerprint + "/" + secrets.token_hex(4)] = future
    meta = FrameBuilder(ddf._meta, "pandas", spec).build()
    return ddf.map_partitions(_enrich_partition, plan, actor, meta=meta, align_dataframes=False)

"""Enrichment of a Spark DataFrame: ``parallel_async.spark.enrich(df, output=..., ...)``.

Needs the ``spark`` extra (``pip install 'parallel-async[spark]'``: pyspark and pyarrow). See
the Spark page of the docs for the guarantee (one run per row, even when Spark re-runs a task)
and what it assumes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ._cluster import DEFAULT_WINDOW, create_groups, plan_job
from ._cluster_arrow import enrich_batches
from ._cluster_limit import Coordinator, Unit
from ._cluster_service import HttpLink, service_on
from ._errors import InvalidArgumentError, MissingDependencyError
from ._fields import RESERVED_COLUMNS, OutputField

__all__ = ["enrich"]


def _require() -> Any:
    try:
        import pyarrow  # noqa: F401
        import pyspark.sql
    except ImportError as exc:
        raise MissingDependencyError(
            f"parallel_async.spark needs pyspark and pyarrow ({exc.name} is missing): "
            "pip install 'parallel-async[spark]'"
        ) from None
    return pyspark.sql


def _spark_type(field: OutputField) -> Any:
    from pyspark.sql import types

    scalars = {
        "str": types.StringType(),
        "int": types.LongType(),
        "float": types.DoubleType(),
        "bool": types.BooleanType(),
    }
    item = field.item_type
    if item is not None:
        return types.ArrayType(scalars[item], containsNull=True)
    return scalars.get(field.type, types.StringType())


def _driver_host(session: Any) -> str:
    """Where the executors reach the driver: loopback for a local master."""
    context = session.sparkContext
    if str(context.master).startswith("local"):
        return "127.0.0.1"
    host = context.getConf().get("spark.driver.host")
    if not host:
        raise InvalidArgumentError(
            "cannot tell the driver's address (spark.driver.host is unset): pass "
            "coordinator_host='an address the executors reach the driver at'"
        )
    return str(host)


def enrich(
    df: Any,
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
    coordinator_host: str | None = None,
    task_groups: int | None = None,
) -> Any:
    """Enrich a Spark DataFrame: one run per row, each row answered once.

    Returns a new (lazy) DataFrame: the input columns unchanged, then one typed column per
    output field (``str`` string, ``int`` bigint, ``float`` double, ``bool`` boolean,
    ``list[T]`` array, anything nested as JSON text), then ``_status``, ``_error`` and
    ``_run_id``. Each partition is one task; its runs live in a task group created here, on
    the driver, before the job; a task Spark runs again adopts the runs its group already
    holds for its rows and creates only the missing ones.

    The driver and every executor read ``PARALLEL_API_KEY`` (and ``PARALLEL_BASE_URL``) from
    their environment (on a cluster: ``spark.executorEnv.PARALLEL_API_KEY``).

    Args:
        df: the DataFrame (classic Spark, not Spark Connect).
        output: what to find for each row (a Struct type, a JSON Schema, the field syntax
            ``"ceo, founded int: year founded"``: see ``client.enrich``).
        processor: the processor of every run.
        columns: the columns that go into each run's input (default: all).
        key: a column naming each row; default: the row's content (of ``columns``).
        timeout: seconds each task waits for its runs; rows still running then come out with
            ``_status`` ``running`` (computing the DataFrame again picks them up).
        create_rate_limit: create requests (or runs) allowed per ``create_rate_window``
            seconds for the whole job, every executor together.
        create_rate_window: the window of ``create_rate_limit``, seconds.
        create_rate_unit: ``"requests"`` (an add of up to 1,000 runs counts once) or
            ``"runs"`` (each run counts; adds then hold at most ``create_rate_limit`` runs).
        reconcile_settle: seconds a create whose answer was lost (a task killed mid-request)
            may take to show up in its group; a re-run task waits for it before listing.
        max_in_flight: most requests each task has open at once.
        window: most rows a task holds at once (its memory bound).
        coordinator_host: the address the executors reach the driver at, for the job's
            coordinator (default: 127.0.0.1 on a local master, else ``spark.driver.host``).
        task_groups: how many task groups to create (partition ``p`` uses group
            ``p % task_groups``); default: the DataFrame's partition count, which Spark
            computes the stages before a shuffle to know when adaptive execution is on.

    Raises:
        InvalidArgumentError: a bad argument, before anything is sent.
        MissingDependencyError: pyspark or pyarrow is not installed.
    """
    sql = _require()
    if not isinstance(df, sql.DataFrame):
        raise InvalidArgumentError(f"df must be a pyspark DataFrame, got {type(df).__name__}")
    spec, plan = plan_job(
        df.columns,
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
    if task_groups is not None and (
        isinstance(task_groups, bool) or not isinstance(task_groups, int) or task_groups < 1
    ):
        raise InvalidArgumentError(f"task_groups must be a positive int, got {task_groups!r}")
    host = coordinator_host or _driver_host(df.sparkSession)
    plan = create_groups(plan, task_groups or df.rdd.getNumPartitions())
    service = service_on(host)
    job = service.register(
        Coordinator(create_rate_limit, create_rate_window, create_rate_unit, reconcile_settle)
    )
    url, secret = service.url, service.secret

    from pyspark.sql import types

    schema = types.StructType(
        [
            *df.schema.fields,
            *(types.StructField(f.name, _spark_type(f), True) for f in spec.fields),
            *(types.StructField(name, types.StringType(), True) for name in RESERVED_COLUMNS),
        ]
    )

    def enrich_partition(batches: Iterator[Any]) -> Iterator[Any]:
        from pyspark import TaskContext

        context = TaskContext.get()
        partition = context.partitionId() if context is not None else 0
        yield from enrich_batches(plan, partition, batches, lambda: HttpLink(url, secret, job))

    return df.mapInArrow(enrich_partition, schema)

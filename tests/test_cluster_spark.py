"""parallel_async.spark.enrich on a real Spark session (local[2], two task threads, up to four
attempts per task), against the fake server running as a process of its own.

Run with ``nox -s cluster`` (pyspark needs Java 17 and pandas < 3)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("pyspark", reason="needs pyspark (the 'cluster' nox session installs it)")
pytest.importorskip("pyarrow", reason="needs pyarrow")

from cluster_server import ClusterServer, most_in_window

from parallel_async import InvalidArgumentError
from parallel_async import spark as pa_spark
from parallel_async._cluster_service import _SERVICES

pytestmark = pytest.mark.cluster

FIELDS = "ceo, founded int, revenue float, public bool, tags list[str], hq: headquarters city"


@pytest.fixture(scope="module")
def server() -> Iterator[ClusterServer]:
    with ClusterServer(duration=0.2) as fake:
        yield fake


@pytest.fixture(scope="module")
def spark(server: ClusterServer) -> Iterator[Any]:
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as mp:
        # The executors' Python workers inherit this environment: the key and the fake's URL.
        for name, value in server.env().items():
            mp.setenv(name, value)
        mp.setenv("PYSPARK_PYTHON", sys.executable)
        mp.setenv("SPARK_LOCAL_IP", "127.0.0.1")
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
        session = (
            SparkSession.builder.master("local[2,4]")  # 2 threads; a task may run 4 times
            .appName("parallel-async cluster tests")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false")
            .config("spark.sql.shuffle.partitions", "2")
            .getOrCreate()
        )
        session.sparkContext.setLogLevel("ERROR")
        try:
            yield session
        finally:
            session.stop()


def companies(spark: Any, n: int, partitions: int) -> Any:
    return spark.range(0, n, numPartitions=partitions).selectExpr(
        "id", "concat('company ', id) AS company", "id % 7 = 0 AS flagged"
    )


def created(server: ClusterServer) -> int:
    return int(server.stats()["runs_created"])


def test_rows_come_back_once_with_typed_columns(spark: Any, server: ClusterServer) -> None:
    df = companies(spark, 300, 3)
    before = created(server)
    out = pa_spark.enrich(df, output=FIELDS, processor="lite")
    schema = {f.name: f.dataType.simpleString() for f in out.schema.fields}
    assert list(schema) == [
        "id", "company", "flagged", "ceo", "founded", "revenue", "public", "tags", "hq",
        "_status", "_error", "_run_id",
    ]  # fmt: skip
    assert schema["founded"] == "bigint"
    assert schema["revenue"] == "double"
    assert schema["public"] == "boolean"
    assert schema["tags"] == "array<string>"
    rows = out.toPandas()
    assert sorted(rows["id"]) == list(range(300))
    assert rows["company"].tolist() == [f"company {i}" for i in rows["id"]]
    assert set(rows["_status"]) == {"completed"}
    assert rows["_error"].isna().all()
    assert rows["_run_id"].nunique() == 300
    assert all(isinstance(v, int) for v in rows["founded"])
    assert created(server) - before == 300
    # Spark computes the DataFrame again for every action: the tasks adopt, nothing new.
    assert out.count() == 300
    assert out.where("_status = 'completed'").count() == 300
    assert created(server) - before == 300
    assert server.stats()["duplicated_rows"] == 0


def test_a_task_failing_after_its_creates_is_retried_without_new_runs(
    spark: Any, server: ClusterServer
) -> None:
    from pyspark.sql import types

    df = companies(spark, 200, 2)
    before = created(server)
    out = pa_spark.enrich(df, output="ceo", processor="lite", reconcile_settle=2.0)

    def fail_once(frames: Iterator[Any]) -> Iterator[Any]:
        from pyspark import TaskContext

        context = TaskContext.get()
        seen = list(frames)  # the whole partition enriched: every create of the task is done
        if context.partitionId() == 0 and context.attemptNumber() == 0:
            raise RuntimeError("injected: the task fails after its creates")
        for frame in seen:
            yield frame.assign(attempt=context.attemptNumber())

    schema = types.StructType([*out.schema.fields, types.StructField("attempt", types.LongType())])
    rows = out.mapInPandas(fail_once, schema).toPandas()
    assert sorted(rows["id"]) == list(range(200))
    assert set(rows["attempt"]) == {0, 1}  # partition 0 ran twice
    assert set(rows["_status"]) == {"completed"}
    assert rows["_run_id"].nunique() == 200
    assert created(server) - before == 200
    assert server.stats()["duplicated_rows"] == 0


def test_one_rate_limit_for_every_task_measured_at_the_server(
    spark: Any, server: ClusterServer
) -> None:
    df = companies(spark, 600, 2)
    before = server.stats()
    out = pa_spark.enrich(
        df,
        output="ceo",
        processor="lite",
        create_rate_limit=200,
        create_rate_window=5.0,
        create_rate_unit="runs",
    )
    rows = out.toPandas()
    after = server.stats()
    assert len(rows) == 600
    assert set(rows["_status"]) == {"completed"}
    assert after["runs_created"] - before["runs_created"] == 600
    times = after["run_times"][len(before["run_times"]) :]
    assert most_in_window(times, 5.0) <= 200
    requests = after["create_requests"][len(before["create_requests"]) :]
    assert max(runs for _, runs in requests) <= 200


def test_a_429_slows_every_task(spark: Any, server: ClusterServer) -> None:
    df = companies(spark, 160, 4)
    before = server.stats()
    server.control(rate=[1, 1.0])  # the server allows one add per second
    try:
        out = pa_spark.enrich(df, output="ceo", processor="lite")
        rows = out.toPandas()
    finally:
        server.control(rate=None)
    after = server.stats()
    assert len(rows) == 160
    assert set(rows["_status"]) == {"completed"}
    assert after["runs_created"] - before["runs_created"] == 160
    assert after["rate_limited"] > before["rate_limited"]
    pauses = sum(
        service.coordinator(job).stats["pauses"]
        for service in _SERVICES.values()
        for job in list(service._jobs)
    )
    assert pauses >= 1


def test_bad_arguments_fail_on_the_driver(spark: Any, server: ClusterServer) -> None:
    df = companies(spark, 10, 1)
    before = server.stats()
    with pytest.raises(InvalidArgumentError, match="already has column"):
        pa_spark.enrich(df, output="company", processor="lite")
    with pytest.raises(InvalidArgumentError, match="no column"):
        pa_spark.enrich(df, output="ceo", processor="lite", key="missing")
    with pytest.raises(InvalidArgumentError, match="pyspark DataFrame"):
        pa_spark.enrich([{"a": 1}], output="ceo", processor="lite")
    assert server.stats()["group_creates"] == before["group_creates"]

"""Enrichment on Spark and Dask against one process: ``python benchmarks/cluster.py --rows N``.

Runs N rows through (1) ``client.enrich`` in one process (the baseline), (2)
``parallel_async.spark.enrich`` on Spark ``local[2]`` and (3) ``parallel_async.dask.enrich`` on
a ``distributed.LocalCluster`` with two worker processes, all against the fake server running
as a process of its own (``tests/cluster_server.py``), and reports for each:

* runs the server created and rows that came out (both must equal N: one run per row);
* CPU seconds per row of the processes doing the work: the baseline process; Spark's Python
  workers (the JVM's own CPU is reported beside it); the Dask worker processes (their whole
  CPU, Dask's own bookkeeping included); and the ratio to the baseline;
* peak memory (``VmHWM``) of each worker process. The engines write the result to Parquet (as
  a job would), so no worker holds the whole result: run two table sizes with the same
  partition size to see that a worker's peak does not grow with the table.
  ``--engines sequential`` runs the Dask task's code for every partition one after another in
  one process (no engine) and gives its peak after each partition.

Needs pyspark, dask[distributed], pandas < 3 and psutil (the ``cluster`` nox session's env).
Results go to ``benchmarks/results/cluster.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from cluster_server import ClusterServer, LocalLink  # noqa: E402

FIELDS = "ceo, founded int, public bool"


def _peak_mb(pid: int | None = None) -> float:
    path = Path(f"/proc/{pid or 'self'}/status")
    for line in path.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def baseline(rows: int) -> dict[str, Any]:
    """``client.enrich`` of ``rows`` rows in this process (run in a child by `main`)."""
    import anyio

    from parallel_async import AsyncParallel

    records = [{"id": i, "company": f"company {i}"} for i in range(rows)]

    async def run() -> list[Any]:
        async with AsyncParallel() as client:
            return list(await client.enrich(records, output=FIELDS, processor="lite"))

    cpu, wall = _cpu(), time.monotonic()
    out = anyio.run(run)
    return {
        "rows_out": len(out),
        "completed": sum(r["_status"] == "completed" for r in out),
        "cpu_s": _cpu() - cpu,
        "wall_s": time.monotonic() - wall,
        "peak_mb": _peak_mb(),
    }


def _read(path: str) -> Any:
    """The checked columns of a written result."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=["id", "_status", "_run_id"]).to_pandas()
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _python_descendants(pid: int) -> list[Any]:
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True) if "python" in p.name().lower()]


def spark(rows: int, partitions: int) -> dict[str, Any]:
    """``parallel_async.spark.enrich`` on local[2]."""
    import psutil
    from pyspark.sql import SparkSession

    from parallel_async import spark as pa_spark

    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    session = (
        SparkSession.builder.master("local[2]")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.python.worker.reuse", "true")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    try:
        jvm = next(
            p for p in psutil.Process().children(recursive=True) if "java" in p.name().lower()
        )
        df = session.range(0, rows, numPartitions=partitions).selectExpr(
            "id", "concat('company ', id) AS company"
        )
        jvm_cpu = sum(jvm.cpu_times()[:2])
        wall = time.monotonic()
        out = pa_spark.enrich(df, output=FIELDS, processor="lite")
        path = tempfile.mkdtemp(prefix="cluster-bench-")
        out.write.mode("overwrite").parquet(path)
        wall = time.monotonic() - wall
        result = _read(path)
        workers = _python_descendants(jvm.pid)
        cpu = 0.0
        peaks = []
        for worker in workers:
            times = worker.cpu_times()
            cpu += times.user + times.system + times.children_user + times.children_system
            peaks.append(_peak_mb(worker.pid))
        return {
            "rows_out": len(result),
            "distinct_rows": int(result["id"].nunique()),
            "completed": int((result["_status"] == "completed").sum()),
            "cpu_s": cpu,
            "jvm_cpu_s": sum(jvm.cpu_times()[:2]) - jvm_cpu,
            "wall_s": wall,
            "worker_peak_mb": sorted(peaks, reverse=True),
            "python_workers": len(workers),
        }
    finally:
        session.stop()


def _worker_usage() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, _peak_mb()


def dask(rows: int, partitions: int) -> dict[str, Any]:
    """``parallel_async.dask.enrich`` on a LocalCluster of two worker processes."""
    import dask.dataframe as dd
    import distributed
    import pandas as pd

    from parallel_async import dask as pa_dask

    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # a free port: never 8787, maybe taken
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        frame = pd.DataFrame({"id": range(rows), "company": [f"company {i}" for i in range(rows)]})
        ddf = dd.from_pandas(frame, npartitions=partitions)
        start = client.run(_worker_usage)
        wall = time.monotonic()
        out = pa_dask.enrich(ddf, output=FIELDS, processor="lite")
        path = tempfile.mkdtemp(prefix="cluster-bench-")
        out.to_parquet(path)
        wall = time.monotonic() - wall
        result = _read(path)
        end = client.run(_worker_usage)
        return {
            "rows_out": len(result),
            "distinct_rows": int(result["id"].nunique()),
            "completed": int((result["_status"] == "completed").sum()),
            "cpu_s": sum(end[w][0] - start[w][0] for w in end),
            "wall_s": wall,
            "worker_peak_mb": sorted((end[w][1] for w in end), reverse=True),
        }


def sequential(rows: int, partitions: int) -> dict[str, Any]:
    """The Dask task's own code for every partition, one after another, in this process.

    Shows what the enrichment itself holds: the peak after each partition, without Dask.
    """
    import anyio
    import pandas as pd

    from parallel_async._cluster import create_groups, partition_job, plan_job
    from parallel_async._cluster_limit import Coordinator

    plan = plan_job(
        ["id", "company"],
        output=FIELDS,
        processor="lite",
        columns=None,
        key=None,
        timeout=None,
        create_rate_limit=2000,
        create_rate_window=60.0,
        create_rate_unit="requests",
        reconcile_settle=1.0,
        max_in_flight=100,
    )[1]
    plan = create_groups(plan, partitions)
    link = LocalLink(Coordinator(2000, 60.0, "requests", 1.0))
    size = rows // partitions
    peaks = []
    done = 0
    cpu, wall = _cpu(), time.monotonic()
    for partition in range(partitions):
        ids = range(partition * size, (partition + 1) * size)
        frame = pd.DataFrame({"id": ids, "company": [f"company {i}" for i in ids]})

        async def run(frame: Any = frame, partition: int = partition) -> Any:
            async with partition_job(plan, partition, link) as start:
                return await start(frame)

        out = anyio.run(run)
        done += int((out["_status"] == "completed").sum())
        del out, frame
        peaks.append(round(_peak_mb(), 1))
    return {
        "rows_out": size * partitions,
        "distinct_rows": size * partitions,
        "completed": done,
        "cpu_s": _cpu() - cpu,
        "wall_s": time.monotonic() - wall,
        "peak_mb_after_each_partition": peaks,
    }


def _child(kind: str, rows: int, partitions: int, env: dict[str, str]) -> dict[str, Any]:
    """Run one measurement in a fresh process (clean CPU and memory counters)."""
    args = [sys.executable, __file__, "--child", kind, "--rows", str(rows)]
    args += ["--partitions", str(partitions)]
    done = subprocess.run(
        args, env={**os.environ, **env}, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "results" / "cluster.json"))
    parser.add_argument("--engines", default="baseline,spark,dask", help="and sequential")
    parser.add_argument("--duration", type=float, default=0.5, help="fake run duration, s")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "baseline":
            result = baseline(args.rows)
        else:
            engines = {"spark": spark, "dask": dask, "sequential": sequential}
            result = engines[args.child](args.rows, args.partitions)
        print(json.dumps(result))
        return
    report: dict[str, Any] = {"rows": args.rows, "partitions": args.partitions}
    with ClusterServer(duration=args.duration) as server:
        for kind in args.engines.split(","):
            before = server.stats()["runs_created"]
            result = _child(kind, args.rows, args.partitions, server.env())
            result["runs_created"] = server.settled()["runs_created"] - before
            result["cpu_ms_per_row"] = 1000 * result["cpu_s"] / args.rows
            report[kind] = result
            print(kind, json.dumps(result), flush=True)
    base = report.get("baseline", {}).get("cpu_ms_per_row")
    for kind in ("spark", "dask"):
        if base and kind in report:
            report[kind]["cpu_ratio_to_baseline"] = report[kind]["cpu_ms_per_row"] / base
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

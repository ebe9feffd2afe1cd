"""parallel_async.dask.enrich on a real distributed.LocalCluster (two worker processes), against
the fake server running as a process of its own; one worker is killed mid-job.

Run with ``nox -s cluster``."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

dd = pytest.importorskip("dask.dataframe", reason="needs dask (the 'cluster' nox session)")
distributed = pytest.importorskip("distributed", reason="needs distributed")
pd = pytest.importorskip("pandas")

from cluster_server import ClusterServer, most_in_window  # noqa: E402

from parallel_async import InvalidArgumentError  # noqa: E402
from parallel_async import dask as pa_dask  # noqa: E402

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def server() -> Iterator[ClusterServer]:
    with ClusterServer(duration=0.2) as fake:
        yield fake


@pytest.fixture(scope="module")
def client(server: ClusterServer) -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in server.env().items():  # the workers inherit the key and URL
            mp.setenv(name, value)
        cluster = distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # a free port: never 8787, maybe taken
            silence_logs=logging.CRITICAL,
        )
        with cluster, distributed.Client(cluster) as dask_client:
            yield dask_client


def companies(n: int, partitions: int) -> Any:
    frame = pd.DataFrame({"company": [f"company {i}" for i in range(n)], "n": range(n)})
    frame.index = frame.index * 10  # an index of its own: kept as is
    return dd.from_pandas(frame, npartitions=partitions)


def created(server: ClusterServer) -> int:
    return int(server.stats()["runs_created"])


def latest_actor() -> tuple[Any, Any]:
    """The actor of the latest job, and its future."""
    future = pa_dask._ACTORS[list(pa_dask._ACTORS)[-1]]
    return future.result(), future


def test_rows_come_back_once_with_typed_columns(client: Any, server: ClusterServer) -> None:
    before = created(server)
    out = pa_dask.enrich(
        companies(300, 3), output="ceo, founded int, tags list[str], public bool", processor="lite"
    )
    assert list(out.columns) == [
        "company", "n", "ceo", "founded", "tags", "public", "_status", "_error", "_run_id",
    ]  # fmt: skip
    assert str(out.dtypes["founded"]) == "Int64"
    frame = out.compute()
    assert frame.index.tolist() == [i * 10 for i in range(300)]
    assert frame["n"].tolist() == list(range(300))
    assert set(frame["_status"]) == {"completed"}
    assert frame["_run_id"].nunique() == 300
    assert str(frame.dtypes["public"]) == "boolean"
    assert created(server) - before == 300
    again = out.compute()  # computed again: every task adopts its runs
    assert again["_run_id"].tolist() == frame["_run_id"].tolist()
    assert created(server) - before == 300


def test_a_worker_killed_mid_job_costs_no_second_run(client: Any, server: ClusterServer) -> None:
    server.control(duration=3.0)  # runs long enough to kill a worker while they run
    try:
        before = created(server)
        out = pa_dask.enrich(
            companies(800, 8), output="ceo", processor="lite", reconcile_settle=1.0
        )
        actor, actor_future = latest_actor()
        holder = client.who_has([actor_future])[actor_future.key][0]
        pids = client.run(os.getpid)
        victim = next(address for address in pids if address != holder)
        job = client.compute(out)
        deadline = time.monotonic() + 60
        while created(server) - before < 400:  # both workers' first tasks made their runs
            assert time.monotonic() < deadline, "the runs were never created"
            time.sleep(0.05)
        os.kill(pids[victim], signal.SIGKILL)
        frame = job.result(timeout=180)
    finally:
        server.control(duration=0.2)
    assert frame["n"].tolist() == list(range(800))
    assert set(frame["_status"]) == {"completed"}
    assert frame["_run_id"].nunique() == 800
    assert created(server) - before == 800
    assert server.stats()["duplicated_rows"] == 0
    assert actor.stats().result()["attempts"] > 8  # the dead worker's tasks ran again


def test_a_worker_killed_while_its_adds_are_in_flight_costs_no_second_run(
    client: Any, server: ClusterServer
) -> None:
    """The hard case: the server is still creating the dead worker's runs when Dask runs its
    tasks again. The new attempts wait until those creates are ``reconcile_settle`` old, so
    the runs are listed, and adopted, instead of created twice."""
    server.control(add_delay=6.0, duration=0.5)
    try:
        before = server.stats()
        out = pa_dask.enrich(
            companies(400, 4), output="ceo", processor="lite", reconcile_settle=8.0
        )
        actor, actor_future = latest_actor()
        holder = client.who_has([actor_future])[actor_future.key][0]
        pids = client.run(os.getpid)
        victim = next(address for address in pids if address != holder)
        job = client.compute(out)
        deadline = time.monotonic() + 60
        while server.stats()["add_requests"] - before["add_requests"] < 4:
            assert time.monotonic() < deadline, "the adds were never sent"
            time.sleep(0.02)
        assert created(server) == before["runs_created"]  # accepted, not created yet
        os.kill(pids[victim], signal.SIGKILL)
        frame = job.result(timeout=180)
        after = server.settled()  # every add the server accepted has made its runs
    finally:
        server.control(add_delay=0.0, duration=0.2)
    assert frame["n"].tolist() == list(range(400))
    assert set(frame["_status"]) == {"completed"}
    assert after["runs_created"] - before["runs_created"] == 400
    assert after["duplicated_rows"] == 0
    assert actor.stats().result()["attempts"] > 4


def test_one_rate_limit_for_every_worker_measured_at_the_server(
    client: Any, server: ClusterServer
) -> None:
    before = server.stats()
    out = pa_dask.enrich(
        companies(600, 6),
        output="ceo",
        processor="lite",
        create_rate_limit=200,
        create_rate_window=5.0,
        create_rate_unit="runs",
    )
    frame = out.compute()
    after = server.stats()
    assert len(frame) == 600
    assert set(frame["_status"]) == {"completed"}
    assert after["runs_created"] - before["runs_created"] == 600
    times = after["run_times"][len(before["run_times"]) :]
    assert most_in_window(times, 5.0) <= 200
    requests = after["create_requests"][len(before["create_requests"]) :]
    assert max(runs for _, runs in requests) <= 200
    actor, _ = latest_actor()
    assert actor.stats().result()["runs"] == 600


def test_a_limit_in_requests_counts_each_add_once(client: Any, server: ClusterServer) -> None:
    before = server.stats()
    out = pa_dask.enrich(
        companies(300, 6),
        output="ceo",
        processor="lite",
        create_rate_limit=2,
        create_rate_window=2.0,
        create_rate_unit="requests",
    )
    frame = out.compute()
    after = server.stats()
    assert set(frame["_status"]) == {"completed"}
    assert after["runs_created"] - before["runs_created"] == 300
    requests = after["create_requests"][len(before["create_requests"]) :]
    assert len(requests) == 6  # one add per partition
    assert most_in_window([at for at, _ in requests], 2.0) <= 2


def test_bad_arguments_fail_in_the_client(client: Any, server: ClusterServer) -> None:
    before = server.stats()
    with pytest.raises(InvalidArgumentError, match="already has column"):
        pa_dask.enrich(companies(10, 1), output="company", processor="lite")
    with pytest.raises(InvalidArgumentError, match="Dask DataFrame"):
        pa_dask.enrich(pd.DataFrame({"a": [1]}), output="ceo", processor="lite")
    assert server.stats()["group_creates"] == before["group_creates"]

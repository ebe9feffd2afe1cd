"""client.enrich against the fake server: one run per row, in order, resumable, never twice."""

from __future__ import annotations

import pathlib
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import msgspec
import pytest

from parallel_async import (
    AsyncParallel,
    AuthenticationError,
    EnrichedRow,
    EnrichProgress,
    FieldSpecError,
    InvalidArgumentError,
    JournalError,
    _enrich_runs,
    enrich_sync,
    job_fingerprint,
    output_spec,
    row_key,
)
from parallel_async._fields import ATTEMPT_METADATA, ROW_KEY_METADATA
from parallel_async._journal import Journal
from parallel_async.testing import FakeParallel, FakeServer, Fault, RunPlan

pytestmark = pytest.mark.anyio

KEY = "test-key"
FIELDS = "ceo: the CEO's full name, founded int: year founded, public bool"


def companies(n: int) -> list[dict[str, Any]]:
    return [{"name": f"Company {i}", "country": "NO" if i % 2 else "SE"} for i in range(n)]


def failing(names: set[str]) -> Any:
    def plan(body: dict[str, Any]) -> RunPlan | None:
        if body["input"].get("name") in names:
            return RunPlan(outcome="failed", error_message="no sources found")
        return None

    return plan


@pytest.fixture
async def fake() -> AsyncIterator[FakeParallel]:
    fake = FakeParallel(api_key=KEY, duration=0.01)
    yield fake
    fake.close()


@pytest.fixture
async def server(fake: FakeParallel) -> AsyncIterator[FakeServer]:
    async with FakeServer(fake) as server:
        yield server


@pytest.fixture
async def client(server: FakeServer, no_sleep: list[float]) -> AsyncIterator[AsyncParallel]:
    async with AsyncParallel(api_key=KEY, base_url=server.url, max_in_flight=16) as client:
        client.task_group.reconcile_settle = 0.2
        yield client


def runs_per_row(fake: FakeParallel) -> Counter[tuple[str, int]]:
    return Counter(
        (r.metadata[ROW_KEY_METADATA], r.metadata[ATTEMPT_METADATA]) for r in fake.runs.values()
    )


@pytest.fixture
def full_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches go out full (or when the rows end), never after a linger.

    Otherwise a reader that lags the 0.2 s linger on a loaded machine splits a batch, and
    how many adds a job takes depends on the machine.
    """
    monkeypatch.setattr(_enrich_runs, "BATCH_LINGER", 3600.0)


@pytest.mark.usefixtures("full_batches")
async def test_rows_come_back_enriched_in_input_order(
    client: AsyncParallel, fake: FakeParallel, tmp_path: pathlib.Path
) -> None:
    rows = companies(1234)
    fake.plan = failing({"Company 7"})
    job = client.enrich(rows, output=FIELDS, processor="lite", journal=tmp_path / "j.sqlite3")
    async with job as results:
        out = [row async for row in results]
    assert [r["name"] for r in out] == [r["name"] for r in rows]
    assert [r.position for r in out] == list(range(1234))
    first = out[0]
    assert isinstance(first, EnrichedRow)
    assert list(first) == ["name", "country", "ceo", "founded", "public", "_status", "_error",
                           "_run_id"]  # fmt: skip
    assert first["_status"] == "completed" and first["_error"] is None
    assert isinstance(first["founded"], int) and isinstance(first["public"], bool)
    assert first["_run_id"] in fake.runs
    assert first.basis["ceo"].citations[0].url.startswith("https://")
    assert out[7].status == "failed"
    assert out[7]["_error"] == "no sources found"
    assert out[7]["ceo"] is None and out[7]["_run_id"] in fake.runs
    assert fake.stats.runs_created == 1234
    assert fake.stats.requests["group_add_runs"] == 2  # adds of up to 1,000: 1,000 then 234
    assert set(runs_per_row(fake).values()) == {1}
    summary = job.summary
    assert summary is not None
    assert (summary.rows, summary.completed, summary.failed, summary.created) == (
        1234,
        1233,
        1,
        1234,
    )
    assert summary.finished and summary.group_id in fake.groups
    # each run's input is the row; its metadata names the row
    run = fake.runs[first["_run_id"]]
    fp = job_fingerprint(output_spec(FIELDS), "lite")
    assert run.input["input"] == rows[0]
    assert run.metadata[ROW_KEY_METADATA] == row_key(rows[0], fingerprint=fp)
    assert run.metadata[ATTEMPT_METADATA] == 1
    assert run.input["task_spec"]["output_schema"]["json_schema"] == output_spec(FIELDS).schema


async def test_completion_order(client: AsyncParallel, fake: FakeParallel) -> None:
    rows = companies(30)
    # Company 0 runs until every other row is out: a row waits for no earlier one
    fake.plan = lambda body: RunPlan(duration=None) if body["input"] == rows[0] else None
    out: list[EnrichedRow] = []
    async with client.enrich(rows, output="ceo", processor="lite", order="completed") as results:
        async for row in results:
            out.append(row)
            if len(out) == 29:
                (first,) = [i for i, r in fake.runs.items() if r.input["input"] == rows[0]]
                fake.complete(first)
    assert out[-1]["name"] == "Company 0"
    assert sorted(r.position for r in out) == list(range(30))


async def test_a_second_invocation_asks_nothing_again(
    client: AsyncParallel, fake: FakeParallel, tmp_path: pathlib.Path
) -> None:
    journal = tmp_path / "j.sqlite3"
    rows = companies(300)
    fake.plan = failing({"Company 3", "Company 4"})
    first = await client.enrich(rows, output=FIELDS, processor="lite", journal=journal)
    fake.stats.reset()
    job = client.enrich(rows, output=FIELDS, processor="lite", journal=journal)
    second = await job
    assert second == first
    assert fake.stats.runs_created == 0
    assert fake.stats.requests["result"] == 0  # answers come from the journal
    assert job.summary is not None and job.summary.reused == 300
    # --retry-failed: only the failed rows get a (second) run
    fake.plan = None
    job = client.enrich(rows, output=FIELDS, processor="lite", journal=journal, retry_failed=True)
    third = await job
    assert fake.stats.runs_created == 2
    assert [r["_status"] for r in third].count("completed") == 300
    assert third[3]["_run_id"] != first[3]["_run_id"]
    assert third[5] == first[5]
    for part in (journal, pathlib.Path(f"{journal}-wal")):  # the key is never written down
        if part.exists():
            assert KEY.encode() not in part.read_bytes()
    assert runs_per_row(fake)[(row_key(rows[3], fingerprint=job.summary.fingerprint), 2)] == 1  # type: ignore[union-attr]


async def test_a_changed_question_makes_new_runs(
    client: AsyncParallel, fake: FakeParallel, tmp_path: pathlib.Path
) -> None:
    journal = tmp_path / "j.sqlite3"
    rows = companies(20)
    await client.enrich(rows, output="ceo", processor="lite", journal=journal)
    await client.enrich(rows, output="ceo", processor="base", journal=journal)
    await client.enrich(rows, output="ceo, founded int", processor="lite", journal=journal)
    await client.enrich(rows, output="ceo", processor="lite", journal=journal, columns=["name"])
    assert fake.stats.runs_created == 80
    await client.enrich(rows, output="ceo", processor="lite", journal=journal)
    assert fake.stats.runs_created == 80
    with sqlite3.connect(journal) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (4,)


async def test_keys_from_a_column_and_duplicate_rows(
    client: AsyncParallel, fake: FakeParallel
) -> None:
    rows = [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}, {"id": 1, "name": "A again"}]
    out = await client.enrich(rows, output="ceo", processor="lite", key="id")
    assert fake.stats.runs_created == 2  # the same key is the same row: one run answers both
    assert out[0]["_run_id"] == out[2]["_run_id"]
    assert [r["name"] for r in out] == ["A", "B", "A again"]
    same = [{"name": "X"}, {"name": "X"}, {"name": "Y"}]
    out = await client.enrich(same, output="ceo", processor="lite")
    assert fake.stats.runs_created == 4


async def test_bad_rows_fail_alone(client: AsyncParallel, fake: FakeParallel) -> None:
    rows: list[Any] = [{"id": 1}, {"name": "no id"}, "not a dict", {"id": 4, "blob": "x" * 30_000}]
    out = await client.enrich(rows, output="ceo", processor="lite", key="id")
    assert [r["_status"] for r in out] == ["completed", "failed", "failed", "failed"]
    assert "key column 'id'" in out[1]["_error"]
    assert "dict" in out[2]["_error"]
    assert "25,000" in out[3]["_error"]
    assert fake.stats.runs_created == 1


async def test_arguments_are_checked_before_any_request(
    client: AsyncParallel, fake: FakeParallel
) -> None:
    with pytest.raises(FieldSpecError):
        client.enrich([], output="ceo int8", processor="lite")
    bad: tuple[dict[str, Any], ...] = (
        {"processor": ""},
        {"order": "random"},
        {"timeout": 0},
        {"window": 0},
        {"columns": "name"},
        {"columns": []},
        {"key": ""},
    )
    for kwargs in bad:
        with pytest.raises(InvalidArgumentError):
            client.enrich([], output="ceo", **{"processor": "lite", **kwargs})
    with pytest.raises(InvalidArgumentError):
        client.enrich({"name": "x"}, output="ceo", processor="lite")
    with pytest.raises(InvalidArgumentError, match="'ceo'"):
        await client.enrich([{"name": "x", "ceo": "y"}], output="ceo", processor="lite")
    assert sum(fake.stats.requests.values()) == 0


async def test_lazy_async_input_and_progress(client: AsyncParallel, fake: FakeParallel) -> None:
    async def source() -> AsyncIterator[dict[str, Any]]:
        for row in companies(40):
            yield row
            if row["name"] == "Company 9":
                await anyio.sleep(0.3)  # a slow source: the first rows go out anyway

    seen: list[EnrichProgress] = []
    out = await client.enrich(source(), output="ceo", processor="lite", progress=seen.append)
    assert len(out) == 40
    assert fake.stats.requests["group_add_runs"] >= 2
    assert seen[0].total is None
    last = seen[-1]
    assert (last.total, last.read, last.completed, last.created, last.done) == (40, 40, 40, 40, 40)
    assert (last.queued, last.running) == (0, 0)
    assert last.rate > 0 and last.eta == 0


async def test_the_window_bounds_what_is_read_ahead(
    client: AsyncParallel, fake: FakeParallel
) -> None:
    fake.manual = True
    read = 0

    def source() -> Iterator[dict[str, Any]]:
        nonlocal read
        for row in companies(5000):
            read += 1
            yield row

    job = client.enrich(source(), output="ceo", processor="lite", window=600)
    async with job as results:
        with anyio.fail_after(10):
            while fake.stats.runs_created < 500:
                await anyio.sleep(0.01)
        assert read <= 600 + 500  # a window plus one read chunk
        for run_id in list(fake.runs):
            fake.complete(run_id)
        got = 0
        async for _ in results:
            got += 1
            if got == 100:
                break
    assert read < 5000


async def test_timeout_leaves_rows_running_for_the_next_invocation(
    client: AsyncParallel, fake: FakeParallel, tmp_path: pathlib.Path
) -> None:
    journal = tmp_path / "j.sqlite3"
    rows = companies(50)
    fake.manual = True
    # Each job ends at its timeout; a timeout far above the ~20 ms the creates (and then
    # the reads of 20 results) take, since a loaded machine can stretch them 30-fold.
    job = client.enrich(rows, output="ceo", processor="lite", journal=journal, timeout=2)
    out = await job
    assert {r["_status"] for r in out} == {"running"}
    assert all(r["_run_id"] for r in out)
    assert job.summary is not None and not job.summary.finished
    for run_id in list(fake.runs)[:20]:
        fake.complete(run_id)
    job = client.enrich(rows, output="ceo", processor="lite", journal=journal, timeout=2)
    out = await job
    assert [r["_status"] for r in out] == ["completed"] * 20 + ["running"] * 30
    for run_id in list(fake.runs)[20:]:
        fake.complete(run_id)
    out = await client.enrich(rows, output="ceo", processor="lite", journal=journal)
    assert {r["_status"] for r in out} == {"completed"}
    assert fake.stats.runs_created == 50


@pytest.mark.usefixtures("full_batches")
async def test_rows_not_sent_before_the_deadline_are_pending(
    client: AsyncParallel, fake: FakeParallel, tmp_path: pathlib.Path
) -> None:
    fake.group_store.hold_adds()  # the first add never answers: its rows may exist
    # the timeout leaves room to send the first add even on a loaded machine
    job = client.enrich(
        companies(1500), output="ceo", processor="lite", journal=tmp_path / "j", timeout=2
    )
    out = await job
    statuses = [r["_status"] for r in out]
    assert statuses == ["running"] * 1000 + ["pending"] * 500  # sent (never again) / not sent
    assert job.summary is not None
    assert (job.summary.running, job.summary.pending, job.summary.finished) == (1000, 500, False)
    fake.group_store.release_adds()
    with sqlite3.connect(tmp_path / "j") as conn:
        assert conn.execute("SELECT status, count(*) FROM rows GROUP BY status").fetchall() == [
            ("intent", 1000)
        ]


async def test_an_intent_without_a_run_is_sent_after_the_settle(
    client: AsyncParallel, fake: FakeParallel, tmp_path: pathlib.Path
) -> None:
    """A crash between committing the intents and sending the add."""
    path = tmp_path / "j.sqlite3"
    rows = companies(10)
    spec = output_spec("ceo")
    fp = job_fingerprint(spec, "lite")
    group = await client.task_group.create()
    async with await Journal.open(path) as journal:
        await journal.job(fp, processor="lite", schema=spec.schema, columns=None, key_column=None)
        await journal.set_group(fp, group.taskgroup_id)
        await journal.write_intents(
            fp, [(row_key(r, fingerprint=fp), 1) for r in rows], time.time()
        )
    started = anyio.current_time()
    out = await client.enrich(rows, output="ceo", processor="lite", journal=path)
    assert anyio.current_time() - started >= 0.2  # waited for the lost add to show up
    assert {r["_status"] for r in out} == {"completed"}
    assert fake.stats.runs_created == 10
    assert set(runs_per_row(fake).values()) == {1}


async def test_an_intent_whose_run_exists_is_adopted(
    client: AsyncParallel, fake: FakeParallel, tmp_path: pathlib.Path
) -> None:
    """A crash after the add was sent, before its answer was journaled."""
    path = tmp_path / "j.sqlite3"
    rows = companies(10)
    spec = output_spec("ceo")
    fp = job_fingerprint(spec, "lite")
    group = await client.task_group.create()
    keys = [row_key(r, fingerprint=fp) for r in rows]
    async with await Journal.open(path) as journal:
        await journal.job(fp, processor="lite", schema=spec.schema, columns=None, key_column=None)
        await journal.set_group(fp, group.taskgroup_id)
        await journal.write_intents(fp, [(k, 1) for k in keys], time.time() + 3600)
    await client.task_group.add_runs(
        group.taskgroup_id,
        inputs=[
            {
                "input": r,
                "processor": "lite",
                "metadata": {ROW_KEY_METADATA: k, ATTEMPT_METADATA: 1},
            }
            for r, k in zip(rows[:6], keys[:6], strict=True)
        ],
        default_task_spec=spec.task_spec,
    )
    # the other four: their add was lost and never processed; the journal says they were
    # sent just now, so they are sent again only after a read that starts a settle later
    async with await Journal.open(path) as journal:
        await journal.write_intents(fp, [(k, 1) for k in keys[6:]], time.time())
    out = await client.enrich(rows, output="ceo", processor="lite", journal=path)
    assert {r["_status"] for r in out} == {"completed"}
    assert fake.stats.runs_created == 10
    assert set(runs_per_row(fake).values()) == {1}


async def test_lost_add_answers_make_no_duplicates(
    client: AsyncParallel, fake: FakeParallel
) -> None:
    fake.faults.script("group_add_runs", [Fault.drop_after(), Fault.ok(), Fault.drop_after()])
    rows = companies(2500)
    out = await client.enrich(rows, output="ceo", processor="lite")
    assert {r["_status"] for r in out} == {"completed"}
    assert fake.stats.runs_created == 2500
    assert fake.stats.dropped == 2


async def test_a_stopping_error_is_raised_after_the_rows_before_it(
    client: AsyncParallel, fake: FakeParallel
) -> None:
    fake.faults.script("group_create", [Fault.status(401)])
    with pytest.raises(AuthenticationError):
        await client.enrich(companies(3), output="ceo", processor="lite")


async def test_leaving_early_keeps_what_finished(
    client: AsyncParallel, fake: FakeParallel, tmp_path: pathlib.Path
) -> None:
    journal = tmp_path / "j.sqlite3"
    rows = companies(200)
    async with client.enrich(rows, output="ceo", processor="lite", journal=journal) as results:
        async for row in results:
            if row.position == 50:
                break
    created = fake.stats.runs_created
    out = await client.enrich(rows, output="ceo", processor="lite", journal=journal)
    assert len(out) == 200
    assert fake.stats.runs_created == 200  # nothing created twice
    assert created <= 200


async def test_basis_file(
    client: AsyncParallel, fake: FakeParallel, tmp_path: pathlib.Path
) -> None:
    basis = tmp_path / "basis.jsonl"
    out = await client.enrich(
        companies(5), output="ceo, founded int", processor="lite", basis=basis
    )
    lines = [msgspec.json.decode(line) for line in basis.read_text().splitlines()]
    assert [line["row"] for line in lines] == [0, 1, 2, 3, 4]
    assert lines[2]["_run_id"] == out[2]["_run_id"]
    assert [b["field"] for b in lines[2]["basis"]] == ["ceo", "founded"]
    assert lines[2]["basis"][0]["confidence"] in ("low", "medium", "high")


async def test_pandas_in_pandas_out(client: AsyncParallel, fake: FakeParallel) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(
        {"name": ["A", "B", None, "D"], "size": [1, 2, 3, None]}, index=["w", "x", "y", "z"]
    )
    fake.plan = failing({"D"})
    out = await client.enrich(df, output="ceo, founded int, score float, ok bool, tags list[str]",
                              processor="lite")  # fmt: skip
    assert list(out.index) == ["w", "x", "y", "z"]
    assert list(out.columns) == ["name", "size", "ceo", "founded", "score", "ok", "tags",
                                 "_status", "_error", "_run_id"]  # fmt: skip
    assert str(out["founded"].dtype) == "Int64"
    assert str(out["score"].dtype) == "Float64"
    assert str(out["ok"].dtype) == "boolean"
    assert out["_status"].tolist() == ["completed", "completed", "completed", "failed"]
    assert out["founded"].isna().tolist() == [False, False, False, True]
    pd.testing.assert_frame_equal(out[["name", "size"]], df)
    assert fake.runs[out["_run_id"]["y"]].input["input"] == {"name": None, "size": 3.0}


async def test_polars_in_polars_out(client: AsyncParallel, fake: FakeParallel) -> None:
    pl = pytest.importorskip("polars")
    df = pl.DataFrame({"name": ["A", "B", "C"], "n": [1, 2, 3]})
    out = await client.enrich(df, output="ceo, founded int, tags list[str]", processor="lite")
    assert out.columns == ["name", "n", "ceo", "founded", "tags", "_status", "_error", "_run_id"]
    assert out.schema["founded"] == pl.Int64
    assert out.schema["tags"] == pl.List(pl.String)
    assert out["_status"].to_list() == ["completed"] * 3
    assert out.select(["name", "n"]).equals(df)


async def test_dataframe_checks(client: AsyncParallel) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"name": ["A"], "ceo": ["x"]})
    with pytest.raises(InvalidArgumentError, match="'ceo'"):
        client.enrich(df, output="ceo", processor="lite")
    with pytest.raises(InvalidArgumentError, match="no column"):
        client.enrich(df, output="hq", processor="lite", key="id")


def test_enrich_sync_without_a_loop(fake_server_url: str) -> None:
    out = enrich_sync(companies(3), output="ceo", processor="lite", api_key=KEY,
                      base_url=fake_server_url)  # fmt: skip
    assert [r["_status"] for r in out] == ["completed"] * 3


def test_enrich_sync_inside_a_running_loop(fake_server_url: str) -> None:
    async def notebook_cell() -> list[EnrichedRow]:
        # as in Jupyter: a loop runs this thread; the job gets a thread and a loop of its own
        rows: list[EnrichedRow] = enrich_sync(
            companies(3), output="ceo", processor="lite", api_key=KEY, base_url=fake_server_url
        )
        return rows

    out = anyio.run(notebook_cell)
    assert [r["_status"] for r in out] == ["completed"] * 3


@pytest.fixture
def fake_server_url() -> Iterator[str]:
    """A fake server on a thread of its own, for sync callers."""
    import threading

    ready = threading.Event()
    stop: list[Any] = []
    url: list[str] = []

    async def serve() -> None:
        fake = FakeParallel(api_key=KEY, duration=0.01)
        async with FakeServer(fake) as server:
            url.append(server.url)
            event = anyio.Event()
            stop.append((anyio.lowlevel.current_token(), event))
            ready.set()
            await event.wait()
        fake.close()

    thread = threading.Thread(target=anyio.run, args=(serve,))
    thread.start()
    ready.wait(10)
    try:
        yield url[0]
    finally:
        token, event = stop[0]
        anyio.from_thread.run_sync(event.set, token=token)
        thread.join(10)


async def test_one_job_per_journal_at_a_time(
    client: AsyncParallel, fake: FakeParallel, tmp_path: pathlib.Path
) -> None:
    journal = tmp_path / "j.sqlite3"
    fake.manual = True
    async with client.enrich(companies(3), output="ceo", processor="lite", journal=journal):
        with pytest.raises(JournalError, match="in use by another process"):
            await client.enrich(companies(3), output="ceo", processor="lite", journal=journal)
    with pytest.raises(InvalidArgumentError, match="cannot write the basis file"):
        await client.enrich(companies(3), output="ceo", processor="lite",
                            basis=tmp_path / "no" / "such" / "dir.jsonl")  # fmt: skip

"""Tables through ``parallel-async enrich``: CSV, JSONL and Parquet keep every input cell, in
order, and add typed fields; a 100,000-row table streams in bounded memory."""

from __future__ import annotations

import csv
import datetime
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from cli_helpers import ThreadedFake, threaded_fake

from parallel_async import job_fingerprint, output_spec, row_key
from parallel_async._cli import main
from parallel_async._journal import Journal

FIELDS = "ceo, founded int, public bool, tags list[str], score float"
TRICKY = [
    "plain",
    "",  # an empty cell
    "Zürich, Schweiz",  # a comma
    "two\nlines",  # a quoted newline
    'she said "hi"',  # quotes
    "日本語 ✓ 🚀",
    "  spaces kept  ",
    "=1+1",  # left as text
]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedFake]:
    with threaded_fake(duration=0.0) as server:
        for name, value in server.env().items():
            if name.startswith("PARALLEL_"):
                monkeypatch.setenv(name, value)
        yield server


def enrich(tmp_path: pathlib.Path, source: str, out: str, *extra: str) -> int:
    return main(["enrich", str(tmp_path / source), "-o", str(tmp_path / out), "--fields", FIELDS,
                 "--journal", str(tmp_path / "j.sqlite3"), *extra])  # fmt: skip


def check_fields(row: dict[str, Any], *, text: bool) -> None:
    if text:  # CSV: the text of typed values
        assert row["founded"].lstrip("-").isdigit()
        assert row["public"] in ("true", "false")
        assert isinstance(json.loads(row["tags"]), list)
        float(row["score"])
    else:
        assert isinstance(row["founded"], int) and not isinstance(row["founded"], bool)
        assert isinstance(row["public"], bool)
        assert isinstance(row["tags"], list) and all(isinstance(t, str) for t in row["tags"])
        assert isinstance(row["score"], float)
    assert row["_status"] == "completed"
    assert row["_error"] in (None, "")
    assert row["_run_id"].startswith("trun_")


def test_csv_round_trip(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    with (tmp_path / "in.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "city", "empty"])
        for i, text in enumerate(TRICKY):
            writer.writerow([f"Company {i}", text, ""])
    assert enrich(tmp_path, "in.csv", "out.csv") == 0
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    assert header == ["name", "city", "empty", "ceo", "founded", "public", "tags", "score",
                      "_status", "_error", "_run_id"]  # fmt: skip
    assert [r[:3] for r in rows] == [[f"Company {i}", t, ""] for i, t in enumerate(TRICKY)]
    for row in rows:
        check_fields(dict(zip(header, row, strict=True)), text=True)
    # each run was asked about its row exactly as written
    inputs = server.call(lambda: [r.input["input"] for r in server.fake.runs.values()])
    assert sorted(i["city"] for i in inputs) == sorted(TRICKY)


def test_jsonl_round_trip(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    records = [
        {"name": text, "n": i, "x": None, "nested": {"a": [1, 2]}, "ok": i % 2 == 0}
        for i, text in enumerate(TRICKY)
    ]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    assert enrich(tmp_path, "in.jsonl", "out.jsonl") == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == len(records)
    for record, row in zip(records, out, strict=True):
        assert list(row)[: len(record)] == list(record)
        assert {k: row[k] for k in record} == record
        check_fields(row, text=False)


def test_parquet_round_trip_keeps_types(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    when = datetime.datetime(2024, 1, 31, 9, 30, tzinfo=datetime.timezone.utc)
    table = pa.table(
        {
            "name": pa.array(TRICKY, pa.string()),
            "n": pa.array(list(range(len(TRICKY))), pa.int32()),
            "price": pa.array([1.5, None, 3.0, 4.25, 0.0, -1.0, 2.0, 9.9], pa.float64()),
            "seen": pa.array([when] * len(TRICKY), pa.timestamp("us", tz="UTC")),
            "labels": pa.array([["a", "b"], [], None, ["ü"], ["x"], [], ["y"], ["z"]]),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    assert enrich(tmp_path, "in.parquet", "out.parquet") == 0
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.names == [*table.schema.names, "ceo", "founded", "public", "tags",
                                "score", "_status", "_error", "_run_id"]  # fmt: skip
    for name in table.schema.names:
        assert out.schema.field(name).type == table.schema.field(name).type
        assert out.column(name).to_pylist() == table.column(name).to_pylist()
    assert out.schema.field("founded").type == pa.int64()
    assert out.schema.field("public").type == pa.bool_()
    assert out.schema.field("tags").type == pa.list_(pa.string())
    assert out.schema.field("score").type == pa.float64()
    for row in out.to_pylist():
        check_fields(row, text=False)


def test_csv_to_parquet_and_jsonl_to_csv(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "in.csv").write_text("id,name\n1,Acme\n2,\n", encoding="utf-8")
    assert enrich(tmp_path, "in.csv", "out.parquet") == 0
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [(r["id"], r["name"]) for r in rows] == [("1", "Acme"), ("2", "")]
    check_fields(rows[0], text=False)
    (tmp_path / "in.jsonl").write_text('{"id": 1, "name": "Acme"}\n{"id": 2, "name": null}\n')
    assert enrich(tmp_path, "in.jsonl", "out.csv") == 0
    with (tmp_path / "out.csv").open(newline="") as f:
        rows2 = list(csv.DictReader(f))
    assert [(r["id"], r["name"]) for r in rows2] == [("1", "Acme"), ("2", "")]


def test_an_empty_table(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    (tmp_path / "in.csv").write_text("id,name\n")
    assert enrich(tmp_path, "in.csv", "out.csv") == 0
    assert (tmp_path / "out.csv").read_text().strip() == (
        "id,name,ceo,founded,public,tags,score,_status,_error,_run_id"
    )


def _peak_rss_mib(rows: int, fresh: int, tmp_path: pathlib.Path, server: ThreadedFake) -> float:
    """Peak memory of ``enrich`` over ``rows`` rows of which the last ``fresh`` need a run (the
    others are answered in its journal already, as when a big job resumes)."""
    source = tmp_path / f"in-{rows}.csv"
    with source.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name", "note"])
        for i in range(rows):
            writer.writerow([i, f"Company {i}", "x" * 40])
    journal = tmp_path / f"j-{rows}.sqlite3"
    anyio.run(_answer, journal, [str(i) for i in range(rows - fresh)])
    out = tmp_path / f"out-{rows}.csv"
    # the command in a process of its own, reporting its peak resident memory (VmHWM, which
    # starts afresh at exec, unlike ru_maxrss)
    peak = (
        "import sys; from parallel_async._cli import main; code = main(sys.argv[1:]); "
        "status = open('/proc/self/status').read(); "
        "print(status.split('VmHWM:')[1].split()[0], file=sys.stderr); sys.exit(code)"
    )
    proc = subprocess.run(  # noqa: S603 - our own command
        [sys.executable, "-c", peak, "enrich", str(source), "-o", str(out), "--fields", "ceo",
         "--key", "id", "--journal", str(journal), "--window", "2000", "--json"],
        env=server.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with out.open(newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["id"] for r in got] == [str(i) for i in range(rows)]
    assert {r["_status"] for r in got} == {"completed"}
    return int(proc.stderr.split()[-1]) / 1024  # KiB


async def _answer(path: pathlib.Path, ids: list[str]) -> None:
    spec = output_spec("ceo")
    fp = job_fingerprint(spec, "lite")
    keys = [row_key({"id": i}, fingerprint=fp, key="id") for i in ids]
    async with await Journal.open(path) as journal:
        await journal.job(fp, processor="lite", schema=spec.schema, columns=None, key_column="id")
        await journal.write_intents(fp, [(k, 1) for k in keys], 0.0)
        journal.record_runs(fp, [(k, f"trun_{n}") for n, k in enumerate(keys)])
        journal.record_outcomes(fp, [(k, "completed", '{"ceo": "x"}', None, "") for k in keys])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_a_100k_row_table_streams_in_bounded_memory(tmp_path: pathlib.Path) -> None:
    with threaded_fake(duration=0.0) as server:
        small = _peak_rss_mib(10_000, 3_000, tmp_path, server)
        large = _peak_rss_mib(100_000, 3_000, tmp_path, server)
        assert server.call(lambda: server.fake.stats.runs_created) == 6_000
    print(f"peak memory: {small:.0f} MiB for 10,000 rows, {large:.0f} MiB for 100,000")
    # ten times the rows, (nearly) the same memory: it depends on --window, not the table
    assert large < small * 1.25 + 8, (small, large)

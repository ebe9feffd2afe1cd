"""The ``parallel-async`` command through real processes: demo, enrich, exit codes, messages."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cli_helpers import KEY, ThreadedFake, cli, cli_env, threaded_fake

from parallel_async.testing import RunPlan


@pytest.fixture
def server() -> Iterator[ThreadedFake]:
    with threaded_fake(duration=0.01) as server:
        yield server


def write_csv(path: pathlib.Path, rows: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name"])
        for i in range(rows):
            writer.writerow([i, f"Company {i}"])


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def requests(server: ThreadedFake) -> int:
    return server.call(lambda: sum(server.fake.stats.requests.values()))


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


def test_version_and_python_m() -> None:
    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip()


def test_demo_needs_no_key(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "demo.csv"
    proc = cli("demo", "--rows", "25", "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "embedded fake Parallel server" in proc.stdout
    assert f"output:  {out}" in proc.stdout
    assert f"journal: {out}.journal.sqlite3" in proc.stdout
    assert "25 rows answered from the journal, 0 runs created" in proc.stdout
    rows = read_csv(out)
    assert len(rows) == 25
    assert list(rows[0])[:3] == ["company", "website", "country"]
    assert list(rows[0])[-3:] == ["_status", "_error", "_run_id"]
    assert pathlib.Path(f"{out}.journal.sqlite3").exists()
    no_traceback(proc)


def test_json_lines_when_not_a_terminal(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    write_csv(tmp_path / "in.csv", 300)
    proc = cli("enrich", "in.csv", "-o", "out.csv", "--fields", "ceo, founded int", "--json",
               env=server.env(), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {line["event"] for line in lines} == {"progress", "summary"}
    summary = lines[-1]
    assert summary["event"] == "summary"
    assert (summary["rows"], summary["completed"], summary["created"], summary["exit_code"]) == (
        300, 300, 300, 0,
    )  # fmt: skip
    assert summary["journal"] == "out.csv.journal.sqlite3"
    progress = [line for line in lines if line["event"] == "progress"]
    assert progress[-1]["completed"] == 300
    assert {"queued", "running", "completed", "failed", "rate", "eta"} <= progress[-1].keys()
    assert proc.stderr == ""


def test_plain_progress_and_summary(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    write_csv(tmp_path / "in.csv", 50)
    proc = cli("enrich", "in.csv", "-o", "out.csv", "--fields", "ceo", env=server.env(),
               cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0
    assert proc.stdout == ""
    assert "rows 50/50" in proc.stderr
    assert "50 rows -> out.csv: 50 completed, 0 failed; 50 runs created" in proc.stderr
    again = cli("enrich", "in.csv", "-o", "out.csv", "--fields", "ceo", env=server.env(),
                cwd=tmp_path)  # fmt: skip
    assert "0 runs created, 50 rows answered from the journal" in again.stderr


def test_exit_1_some_rows_failed(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    def plan(body: dict[str, Any]) -> RunPlan | None:
        if body["input"]["id"] == "3":
            return RunPlan(outcome="failed", error_message="no sources found")
        return None

    server.call(lambda: setattr(server.fake, "plan", plan))
    write_csv(tmp_path / "in.csv", 10)
    proc = cli("enrich", "in.csv", "-o", "out.csv", "--fields", "ceo", env=server.env(),
               cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1
    rows = read_csv(tmp_path / "out.csv")
    assert [r["_status"] for r in rows].count("failed") == 1
    assert rows[3]["_error"] == "no sources found"
    # --retry-failed sends that row again, and only it
    server.call(lambda: setattr(server.fake, "plan", None))
    before = server.call(lambda: server.fake.stats.runs_created)
    proc = cli("enrich", "in.csv", "-o", "out.csv", "--fields", "ceo", "--retry-failed",
               env=server.env(), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0
    assert server.call(lambda: server.fake.stats.runs_created) == before + 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--fields", "ceo, founded integer"], "unknown type 'integer'"),
        (["--fields", "ceo", "--columns", "nope"], "has no column(s) 'nope'"),
        (["--fields", "ceo", "--key", "nope"], "has no column(s) 'nope'"),
        (["--schema", "missing.json"], "cannot read the schema file"),
        (["--fields", "ceo", "--field", "x"], "one way"),
        ([], "say what to find"),
        (["--fields", "id"], "already has column(s) 'id'"),
    ],
)
def test_exit_2_bad_usage(
    server: ThreadedFake, tmp_path: pathlib.Path, args: list[str], needle: str
) -> None:
    write_csv(tmp_path / "in.csv", 3)
    proc = cli("enrich", "in.csv", "-o", "out.csv", *args, env=server.env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert proc.stderr.startswith("parallel-async: error: ")
    no_traceback(proc)
    assert requests(server) == 0
    assert not (tmp_path / "out.csv").exists()


def test_exit_2_bad_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "in.txt").write_text("x")
    for args, needle in (
        (["missing.csv", "-o", "out.csv"], "cannot read missing.csv"),
        (["in.txt", "-o", "out.csv"], "cannot tell the format"),
        (["-", "-o", "out.csv"], "needs --format"),
    ):
        proc = cli("enrich", *args, "--fields", "ceo", cwd=tmp_path, stdin="")
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr
        no_traceback(proc)
    proc = cli("enrich", "--bogus")
    assert proc.returncode == 2  # argparse's own usage errors


def test_field_spec_errors_point_at_the_problem(tmp_path: pathlib.Path) -> None:
    write_csv(tmp_path / "in.csv", 1)
    proc = cli("enrich", "in.csv", "-o", "o.csv", "--fields", "ceo, founded integer: year",
               cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == (
        "parallel-async: error: bad field spec at column 14 (field 2): unknown type 'integer'; "
        "use str, int, float, bool or list[T] of those"
    )
    assert lines[1:] == ["  ceo, founded integer: year", "               ^"]


def test_exit_3_no_key_or_a_refused_key(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    write_csv(tmp_path / "in.csv", 3)
    proc = cli("enrich", "in.csv", "-o", "out.csv", "--fields", "ceo",
               env=cli_env(PARALLEL_BASE_URL=server.url), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 3
    assert "no API key: set PARALLEL_API_KEY" in proc.stderr
    no_traceback(proc)
    proc = cli("enrich", "in.csv", "-o", "out.csv", "--fields", "ceo",
               env=server.env(PARALLEL_API_KEY="wrong"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 3
    assert "refused the key" in proc.stderr
    assert "wrong" not in proc.stderr
    no_traceback(proc)


def test_exit_4_api_error(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    write_csv(tmp_path / "in.csv", 3)
    proc = cli("enrich", "in.csv", "-o", "out.csv", "--fields", "ceo", "--processor", "turbo",
               env=server.env(), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 4, proc.stderr
    assert "processor" in proc.stderr
    no_traceback(proc)
    assert not (tmp_path / "out.csv").exists()


def test_exit_5_time_ran_out_then_resumes(tmp_path: pathlib.Path) -> None:
    write_csv(tmp_path / "in.csv", 20)
    with threaded_fake(manual=True) as server:
        # the timeout leaves room to create the 20 runs, even on a loaded machine
        args = ["enrich", "in.csv", "-o", "out.csv", "--fields", "ceo", "--timeout", "2"]
        proc = cli(*args, env=server.env(), cwd=tmp_path)
        assert proc.returncode == 5, proc.stderr
        assert "time ran out: 20 rows still running" in proc.stderr
        assert "parallel-async enrich in.csv -o out.csv --fields ceo --timeout 2" in proc.stderr
        assert {r["_status"] for r in read_csv(tmp_path / "out.csv")} == {"running"}

        def finish() -> None:
            for run_id in list(server.fake.runs):
                server.fake.complete(run_id)

        server.call(finish)
        proc = cli(*args, env=server.env(), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert {r["_status"] for r in read_csv(tmp_path / "out.csv")} == {"completed"}
        assert server.call(lambda: server.fake.stats.runs_created) == 20


def test_exit_130_ctrl_c_saves_and_says_how_to_resume(tmp_path: pathlib.Path) -> None:
    write_csv(tmp_path / "in.csv", 20)
    with threaded_fake(manual=True) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "parallel_async", "enrich", "in.csv", "-o", "out.csv",
             "--fields", "ceo"],
            env=server.env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while server.call(lambda: server.fake.stats.runs_created) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "saved in the journal" in err
        assert "Resume with:\n  parallel-async enrich in.csv -o out.csv --fields ceo" in err
        assert "Traceback" not in err
        assert not (tmp_path / "out.csv").exists()
        assert not list(tmp_path.glob(".out.csv.partial-*"))


def test_a_malformed_line_is_reported_and_the_job_goes_on(
    server: ThreadedFake, tmp_path: pathlib.Path
) -> None:
    (tmp_path / "in.jsonl").write_text(
        '{"name": "A"}\n{"name": "B"}\n{"name": oops}\n\n[1, 2]\n{"name": "C"}\n'
    )
    proc = cli("enrich", "in.jsonl", "-o", "out.jsonl", "--fields", "ceo", env=server.env(),
               cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1
    assert "in.jsonl:3: malformed JSON" in proc.stderr
    assert "in.jsonl:5: a JSON list, not an object" in proc.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r.get("name") for r in out] == ["A", "B", None, None, "C"]
    assert [r["_status"] for r in out] == ["completed", "completed", "failed", "failed",
                                           "completed"]  # fmt: skip
    assert out[2]["_error"].startswith("line 3: malformed JSON")


def test_dry_run_and_max_cost_send_nothing(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    write_csv(tmp_path / "in.csv", 2500)
    base = ["enrich", "in.csv", "-o", "out.csv", "--fields", "ceo", "--processor", "base"]
    proc = cli(*base, "--dry-run", env=server.env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "runs to create: 2,500" in proc.stdout
    assert "1 group create, 3 add request(s)" in proc.stdout
    assert "estimated cost: $25.00" in proc.stdout
    assert '"ceo"' in proc.stdout  # the compiled schema
    proc = cli(*base, "--dry-run", "--json", env=server.env(), cwd=tmp_path)
    plan = json.loads(proc.stdout)
    assert (plan["to_create"], plan["cost"], plan["prices_as_of"]) == (2500, 25.0, "2026-11")
    prices = tmp_path / "prices.json"
    prices.write_text('{"base": 2}')
    proc = cli(*base, "--dry-run", "--json", "--prices", str(prices), env=server.env(),
               cwd=tmp_path)  # fmt: skip
    assert json.loads(proc.stdout)["cost"] == 5.0
    proc = cli(*base, "--max-cost", "10", env=server.env(), cwd=tmp_path)
    assert proc.returncode == 2
    assert "over --max-cost $10.00; nothing was sent" in proc.stderr
    assert requests(server) == 0
    proc = cli(*base, "--max-cost", "100", env=server.env(), cwd=tmp_path)
    assert proc.returncode == 0
    proc = cli(*base, "--dry-run", "--json", env=server.env(), cwd=tmp_path)
    plan = json.loads(proc.stdout)
    assert (plan["answered"], plan["to_create"], plan["cost"]) == (2500, 0, 0)


def test_stdin_to_stdout(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    data = 'id,name\n1,"Acme, Inc."\n2,Ünïcode\n'
    proc = cli("enrich", "-", "-o", "-", "--format", "csv", "--fields", "ceo",
               "--journal", "j.sqlite3", env=server.env(), cwd=tmp_path, stdin=data)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(proc.stdout.splitlines()))
    assert [(r["id"], r["name"], r["_status"]) for r in rows] == [
        ("1", "Acme, Inc.", "completed"),
        ("2", "Ünïcode", "completed"),
    ]


def test_one_run_commands(server: ThreadedFake, tmp_path: pathlib.Path) -> None:
    proc = cli("run", "Acme Inc.", "--fields", "ceo, founded int", env=server.env())
    assert proc.returncode == 0, proc.stderr
    content = json.loads(proc.stdout)
    assert set(content) == {"ceo", "founded"}
    proc = cli("run", '{"company": "Acme"}', "--full", env=server.env())
    result = json.loads(proc.stdout)
    run_id = result["run"]["run_id"]
    for command in ("status", "input", "result", "events"):
        proc = cli(command, run_id, env=server.env())
        assert proc.returncode == 0, (command, proc.stderr)
        assert proc.stdout.strip()
    assert json.loads(cli("input", run_id, env=server.env()).stdout)["input"] == {"company": "Acme"}
    assert json.loads(cli("status", run_id, env=server.env()).stdout)["status"] == "completed"
    events = [
        json.loads(line) for line in cli("events", run_id, env=server.env()).stdout.splitlines()
    ]
    assert events[-1]["type"] == "task_run.state"
    proc = cli("status", "../etc", env=server.env())
    assert proc.returncode == 2 and "run_id must be" in proc.stderr
    proc = cli("result", "trun_" + "0" * 32, env=server.env())
    assert proc.returncode == 1
    no_traceback(proc)


def test_fake_server_port_in_use() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = cli("fake-server", "--port", str(port), timeout=30)
    assert proc.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in proc.stderr
    no_traceback(proc)
    proc = cli("fake-server", "--duration", "3-1")
    assert proc.returncode == 2 and "--duration" in proc.stderr


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_fake_server_runs_until_sigterm(tmp_path: pathlib.Path) -> None:
    log = tmp_path / "log.jsonl"
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "parallel_async", "fake-server", "--port", "0", "--api-key", KEY,
         "--duration", "0", "--request-log", str(log)],
        stdout=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split("listening on ")[1].split()[0]
        out = cli("run", "Acme", "--fields", "ceo",
                  env=cli_env(PARALLEL_BASE_URL=url, PARALLEL_API_KEY=KEY))  # fmt: skip
        assert out.returncode == 0, out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        tail, _ = proc.communicate(timeout=10)
    assert "created 1 runs" in tail
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries[0]["endpoint"] == "create" and entries[0]["runs_created"] == 1


def _blocking(tmp_path: pathlib.Path, *modules: str) -> str:
    """A PYTHONPATH entry that makes importing ``modules`` fail, as if not installed."""
    folder = tmp_path / "blocked"
    for module in modules:
        (folder / module).mkdir(parents=True, exist_ok=True)
        (folder / module / "__init__.py").write_text(f"raise ImportError('no {module}')\n")
    return str(folder)


def _on_a_terminal(args: list[str], env: dict[str, str], cwd: pathlib.Path) -> tuple[int, str]:
    """Run the command with stderr on a pseudo-terminal; its exit code and what it showed."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "parallel_async", *args],
        env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=follower,
    )  # fmt: skip
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return proc.wait(60), shown.decode(errors="replace")


@pytest.mark.skipif(os.name != "posix", reason="pseudo-terminals")
def test_a_bar_on_a_terminal_and_plain_lines_without_rich(
    server: ThreadedFake, tmp_path: pathlib.Path
) -> None:
    write_csv(tmp_path / "in.csv", 30)
    args = ["enrich", "in.csv", "-o", "out.csv", "--fields", "ceo"]
    code, shown = _on_a_terminal(args, server.env(), tmp_path)
    assert code == 0
    assert "enrich" in shown and "30/30" in shown and "\x1b[" in shown  # rich's live bar
    blocked = _blocking(tmp_path, "rich")
    env = server.env(PYTHONPATH=blocked + os.pathsep + server.env()["PYTHONPATH"])
    code, shown = _on_a_terminal(args, env, tmp_path)
    assert code == 0
    assert "rows 30/30: queued 0, running 0, completed 30" in shown
    assert "\x1b[" not in shown


def test_parquet_without_pyarrow_says_what_to_install(
    server: ThreadedFake, tmp_path: pathlib.Path
) -> None:
    write_csv(tmp_path / "in.csv", 3)
    blocked = _blocking(tmp_path, "pyarrow")
    env = server.env(PYTHONPATH=blocked + os.pathsep + server.env()["PYTHONPATH"])
    proc = cli("enrich", "in.csv", "-o", "out.parquet", "--fields", "ceo", env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "pip install 'parallel-async[parquet]'" in proc.stderr
    no_traceback(proc)
    proc = cli("enrich", "in.csv", "-o", "out.jsonl", "--fields", "ceo", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

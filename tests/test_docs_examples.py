"""Every ```python block of README.md and docs/ is a complete program that runs.

Each block runs as its own process (cwd a temp dir, ``PARALLEL_BASE_URL`` and
``PARALLEL_API_KEY`` pointing at one fake server per module, 60 s timeout) and must exit 0
without an unclosed-resource complaint. The processes are started together when the first
example test runs, a few at a time, so the file takes seconds rather than a minute; each
test then only waits for its own process. A block marked
``<!-- docs-test: skip, covered by tests/test_NAME.py -->`` is skipped here, the named test
file having to exist. Statically, every block (skipped ones included) must compile as a
module (so no top-level ``await``) and use no undefined name.
"""

from __future__ import annotations

import ast
import builtins
import os
import subprocess
import symtable
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from anyio.from_thread import start_blocking_portal
from docs_blocks import ROOT, Block, markers, python_blocks

from parallel_async.testing import FakeParallel, FakeServer

API_KEY = "docs-example-key"
TIMEOUT = 60.0
BLOCKS = python_blocks()
# Signs of an unclosed session or a never-awaited coroutine, which do not change the exit code.
_COMPLAINTS = ("Exception ignored", "Unclosed", "was never awaited")


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    """One fake server for every example, its runs finishing in 50 ms, on a background loop."""
    fake = FakeParallel(api_key=API_KEY, duration=0.05)
    with start_blocking_portal(backend="asyncio") as portal:
        with portal.wrap_async_context_manager(FakeServer(fake)) as server:
            yield server
        portal.call(fake.close)


def _run(block: Block, server_url: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARALLEL_")}
    env |= {"PARALLEL_BASE_URL": server_url, "PARALLEL_API_KEY": API_KEY, "PYTHONPATH": str(ROOT)}
    script = tmp / "example.py"
    script.write_text(block.code, encoding="utf-8")
    command = [sys.executable, "-W", "error", str(script)]
    try:
        return subprocess.run(  # noqa: S603 - our own interpreter on our own docs
            command, cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:  # killed; report it like any failure
        out, err = (
            x.decode() if isinstance(x, bytes) else x or "" for x in (exc.stdout, exc.stderr)
        )
        return subprocess.CompletedProcess(command, -9, out, f"{err}\n(killed after {TIMEOUT} s)")


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest,
    fake_server: FakeServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Future[subprocess.CompletedProcess[str]]]]:
    """Start every selected runnable example at once; their futures, by block id."""
    selected = [  # run only what this session runs (e.g. with -k)
        item.callspec.params["block"]
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.originalname == "test_example_runs"
        and item.path == Path(__file__)
    ]
    todo = [b for b in BLOCKS if b in selected and b.covered_by is None]
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        yield {
            b.id: pool.submit(_run, b, fake_server.url, tmp_path_factory.mktemp("example"))
            for b in todo
        }


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_example_runs(
    block: Block, runs: dict[str, Future[subprocess.CompletedProcess[str]]]
) -> None:
    if block.covered_by is not None:
        assert (ROOT / block.covered_by).is_file(), f"{block.id}: no {block.covered_by}"
        pytest.skip(f"covered by {block.covered_by}")
    done = runs[block.id].result()
    report = f"{block.id} exited {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n"
    report += done.stderr
    assert done.returncode == 0, report
    assert not any(c in done.stderr for c in _COMPLAINTS), report


def undefined_names(code: str, filename: str) -> set[str]:
    """Names a module reads but never binds (nor imports) and that are not builtins."""
    top = symtable.symtable(code, filename, "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    known = bound | set(dir(builtins)) | {"__file__"}
    missing: set[str] = set()
    tables = [top]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for sym in table.get_symbols():
            outer = table is top or sym.is_global()  # resolved at module level
            if outer and sym.is_referenced() and sym.get_name() not in known:
                missing.add(sym.get_name())
    return missing


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_example_is_complete(block: Block) -> None:
    # compile, not just ast.parse: a top-level `await` is a SyntaxError only here.
    compile(block.code, block.id, "exec", dont_inherit=True)
    missing = undefined_names(block.code, block.id)
    assert not missing, f"{block.id}: undefined names {sorted(missing)}"
    if block.covered_by is None:
        tree = ast.parse(block.code)
        defines_coroutine = any(isinstance(node, ast.AsyncFunctionDef) for node in tree.body)
        runs_it = any(
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr == "run"
            for node in tree.body
        )
        assert runs_it or not defines_coroutine, f"{block.id}: defines a coroutine, never runs it"


def test_skip_markers_are_well_formed() -> None:
    for marker in markers():
        where = f"{marker.path}:{marker.line}"
        assert marker.covered_by is not None, (
            f"{where}: write '<!-- docs-test: skip, covered by tests/test_NAME.py -->'"
        )
        assert marker.used, f"{where}: the marker is not followed by a ```python block"


def test_undefined_names_are_found() -> None:
    code = "import anyio\n\n\nasync def main():\n    print(client, [x for x in y])\n"
    assert undefined_names(code, "x.py") == {"client", "y"}
    assert undefined_names("def f(a):\n    return lambda: a + len(a)\n", "x.py") == set()

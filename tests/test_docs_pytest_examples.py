"""The pytest files shown in the docs pass, run by pytest as a user would run them.

Blocks marked ``<!-- docs-test: skip, covered by tests/test_docs_pytest_examples.py -->`` are
test modules, not programs. Those of one page are written into one directory, a block whose
first line is ``# conftest.py`` as its ``conftest.py`` and every other block as a test module
of its own, and a separate pytest process runs them: every test they define must pass.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from docs_blocks import ROOT, Block, python_blocks

THIS = "tests/test_docs_pytest_examples.py"
PAGES: dict[str, list[Block]] = {}
for _block in python_blocks():
    if _block.covered_by == THIS:
        PAGES.setdefault(_block.path, []).append(_block)


def _test_count(code: str) -> int:
    return sum(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")
        for node in ast.parse(code).body
    )


def test_some_page_has_pytest_examples() -> None:
    assert PAGES, f"no docs block is marked as covered by {THIS}"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_pytest_examples_pass(page: str, tmp_path: Path) -> None:
    expected = 0
    for block in PAGES[page]:
        if block.code.startswith("# conftest.py\n"):
            name = "conftest.py"
        else:
            name = f"test_line_{block.line}.py"
            expected += _test_count(block.code)
        assert not (tmp_path / name).exists(), f"{block.id}: a second {name}"
        (tmp_path / name).write_text(block.code, encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")  # pins the rootdir
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARALLEL_", "PYTEST_"))}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-W", "error", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = f"{page}: pytest exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, report
    assert f"{expected} passed" in done.stdout, report

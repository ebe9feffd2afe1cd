"""The Spark and Dask pages' examples, run as the programs they are (each in a process of its
own, against the fake server running as a process of its own). Run with ``nox -s cluster``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_server import ClusterServer

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(page: str) -> list[str]:
    return _BLOCK.findall((ROOT / "docs" / page).read_text())


@pytest.mark.parametrize(("page", "engine"), [("spark.md", "pyspark"), ("dask.md", "distributed")])
def test_the_page_examples_run(page: str, engine: str, tmp_path: Path) -> None:
    pytest.importorskip(engine)
    examples = blocks(page)
    assert examples, f"docs/{page} has no python example"
    with ClusterServer(duration=0.1) as server:
        env = {
            **os.environ,
            **server.env(),
            "PYSPARK_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        for number, code in enumerate(examples):
            script = tmp_path / f"example_{number}.py"
            script.write_text(code)
            done = subprocess.run(  # noqa: S603 - the docs' own example
                [sys.executable, str(script)],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
            assert done.returncode == 0, done.stderr[-4000:]
            assert "completed" in done.stdout
            assert "failed" not in done.stdout
        assert server.stats()["duplicated_rows"] == 0

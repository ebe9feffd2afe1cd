"""Task runner: tests (the README command), lint, typing, docs, demo, bench and minimums."""

from __future__ import annotations

import nox
from packaging.requirements import Requirement

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint", "typing", "docs", "cluster"]
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (against the fake server over real HTTP) with warnings as errors."""
    session.install("-e", ".", *_group("test"))
    session.run("python", "-m", "pytest", "-W", "error", *session.posargs)


@nox.session
def cluster(session: nox.Session) -> None:
    """Spark and Dask enrichment on real engines (pyspark local[2], a two-worker LocalCluster).

    Its own virtualenv: pyspark needs Java 17 and does not support pandas 3 yet. The default
    test run leaves these tests out (``-m "not cluster"`` in pyproject's addopts).
    """
    session.install("-e", ".[spark,dask]", "pandas<3", *_group("test"))
    session.run("python", "-m", "pytest", "-W", "error", "-m", "cluster", *session.posargs)


@nox.session
def bench_cluster(session: nox.Session) -> None:
    """Enrichment on Spark local[2] and two Dask workers against one process (``--rows N``)."""
    session.install("-e", ".[spark,dask]", "pandas<3", *_group("bench"))
    session.run("python", "benchmarks/cluster.py", *session.posargs)


def _lower_bounds() -> list[str]:
    """``name==X`` for every runtime dependency's ``>=X`` in pyproject (markers kept)."""
    pins = []
    for spec in PYPROJECT["project"]["dependencies"]:
        req = Requirement(spec)
        floors = [s.version for s in req.specifier if s.operator == ">="]
        if len(floors) != 1:
            raise ValueError(f"dependency {spec!r} needs exactly one '>=' lower bound")
        marker = f"; {req.marker}" if req.marker else ""
        pins.append(f"{req.name}=={floors[0]}{marker}")
    return pins


@nox.session
def minimums(session: nox.Session) -> None:
    """The test suite on the declared minimum versions (not a default session).

    Every runtime dependency is pinned to its ``>=`` lower bound from pyproject, the test tools
    resolve around those pins, and the package goes in without its own dependency resolution.
    """
    pins = _lower_bounds()
    session.install(*pins, *_group("test"))
    session.install("--no-deps", "-e", ".")
    session.run("python", "-m", "pip", "check")
    session.run("python", "-m", "pip", "list")  # the versions this run tested, for the log
    session.run("python", "-m", "pytest", "-W", "error", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict over the package, tests and benchmarks."""
    session.install("-e", ".", *_group("typing"), *_group("test"), *_group("bench"))
    session.run("mypy", "--strict")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with --strict."""
    session.install("-e", ".", *_group("docs"))
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The showcase: enrich a bundled sample on the embedded fake server (``-- --real``: API)."""
    session.install(".")
    session.run("parallel-async", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: clients compared (run.py), the two tracking strategies (strategies.py), then
    the web-app shape (webapp.py parts A and B; its part C is run.py's N=1,000 table),
    webhook verification throughput (webhooks.py), waiters woken by webhooks against polling
    (webhook_waiters.py) and enrichment against map alone (enrich.py)."""
    session.install("-e", ".", *_group("bench"))
    session.run("python", "benchmarks/run.py", *session.posargs)
    session.run("python", "benchmarks/strategies.py")
    session.run("python", "benchmarks/webapp.py", "--parts", "A", "B")
    session.run("python", "benchmarks/webhooks.py")
    session.run("python", "benchmarks/webhook_waiters.py")
    session.run("python", "benchmarks/enrich.py")

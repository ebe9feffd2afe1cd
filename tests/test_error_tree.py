"""The error tree is closed: every exception class of the library lives in ``_errors.py`` and
derives from ``ParallelError``; the library's own checks raise nothing else."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import parallel_async
from parallel_async import InvalidArgumentError, ParallelError, RetryPolicy, _errors

PACKAGE = Path(parallel_async.__file__).parent


def test_every_exception_class_is_in_errors_and_is_a_parallel_error() -> None:
    for path in PACKAGE.glob("*.py"):  # the library; testing/ is the fake server's own
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception"))
                for b in node.bases
            ):
                assert path.name == "_errors.py", f"{path.name} defines {node.name}"
    classes = [
        c
        for _, c in inspect.getmembers(_errors, inspect.isclass)
        if issubclass(c, BaseException) and c.__module__ == _errors.__name__
    ]
    assert classes
    for cls in classes:
        assert issubclass(cls, ParallelError), cls


def test_no_bare_builtin_exception_is_raised_by_our_checks() -> None:
    builtin = {"ValueError", "RuntimeError", "TypeError", "AssertionError", "KeyError"}
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                name = getattr(node.exc.func, "id", None)
                assert name not in builtin, f"{path.name}:{node.lineno} raises {name}"


def test_public_errors_are_exported() -> None:
    for name in dir(_errors):
        obj = getattr(_errors, name)
        if inspect.isclass(obj) and issubclass(obj, ParallelError) and not name.startswith("_"):
            internal = name in ("BatchError", "StreamReadError")
            assert internal or name in parallel_async.__all__, name


def test_a_bad_retry_policy_is_an_argument_error() -> None:
    with pytest.raises(InvalidArgumentError, match="attempts"):
        RetryPolicy(attempts=0)


def test_the_documented_tree_is_the_code_tree() -> None:
    doc = (PACKAGE.parent / "docs" / "errors.md").read_text()
    drawn = doc.split("```text\n", 1)[1].split("```", 1)[0]
    docstring = _errors.__doc__ or ""
    in_code = docstring.split("    ParallelError\n", 1)[1].split("\n\n", 1)[0]
    assert drawn == "ParallelError\n" + "\n".join(line[4:] for line in in_code.splitlines()) + "\n"
    for line in drawn.splitlines():
        name = line.lstrip("│├└─ ").split(" ", 1)[0]
        cls = getattr(_errors, name)
        assert issubclass(cls, ParallelError), name

"""Helpers for CLI tests: a fake server on a thread of its own, and the command as a process."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from parallel_async.testing import FakeParallel, FakeServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEY = "cli-key"
T = TypeVar("T")


class ThreadedFake:
    """A `FakeParallel` served from its own thread and loop, for commands run as processes."""

    def __init__(self, fake: FakeParallel, url: str, token: Any) -> None:
        self.fake = fake
        self.url = url
        self._token = token

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (to change the fake or read its counters)."""
        return anyio.from_thread.run_sync(fn, token=self._token)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a command that talks to this server."""
        return cli_env(**{"PARALLEL_BASE_URL": self.url, "PARALLEL_API_KEY": KEY, **extra})


@contextmanager
def threaded_fake(**kwargs: Any) -> Iterator[ThreadedFake]:
    """Serve a new fake (``FakeParallel(**kwargs)``) until the block ends."""
    ready = threading.Event()
    box: list[Any] = []

    async def serve() -> None:
        fake = FakeParallel(api_key=KEY, **kwargs)
        stop = anyio.Event()
        try:
            async with FakeServer(fake) as server:
                box.append(ThreadedFake(fake, server.url, anyio.lowlevel.current_token()))
                box.append(stop)
                ready.set()
                await stop.wait()
        finally:
            fake.close()
            ready.set()

    thread = threading.Thread(target=anyio.run, args=(serve,), daemon=True)
    thread.start()
    ready.wait(30)
    server: ThreadedFake = box[0]
    try:
        yield server
    finally:
        server.call(box[1].set)
        thread.join(30)


def cli_env(**extra: str) -> dict[str, str]:
    """The test environment without any API settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARALLEL_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: pathlib.Path | None = None,
    stdin: str | bytes | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m parallel_async ARGS`` and capture its output (text)."""
    data = stdin.decode() if isinstance(stdin, bytes) else stdin
    return subprocess.run(  # noqa: S603 - our own command
        [sys.executable, "-m", "parallel_async", *args],
        env=env if env is not None else cli_env(),
        cwd=cwd,
        input=data,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )

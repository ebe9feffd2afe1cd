"""``FakeServer``: serve a ``FakeParallel`` over real TCP, counting connections.

aiohttp has no hook for connection events, so the listening socket is created here
with a protocol factory that wraps each aiohttp ``RequestHandler`` in a thin proxy:
the proxy counts ``connection_made``/``connection_lost`` and forwards every protocol
callback unchanged. Everything else (startup, shutdown, request handling) is aiohttp's
own ``AppRunner``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
from collections.abc import Callable, Mapping
from types import TracebackType

from aiohttp import web

from ._fake import FakeParallel
from ._state import PlanFunction
from ._stats import Stats

__all__ = ["FakeServer", "run_fake_server"]


class _CountingProtocol(asyncio.Protocol):
    """Forwards to an aiohttp protocol, counting the connection in ``stats``."""

    __slots__ = ("_inner", "_open", "_stats")

    def __init__(self, inner: asyncio.Protocol, stats: Stats) -> None:
        self._inner = inner
        self._stats = stats
        self._open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._open = True
        self._stats.connection_opened()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._open:
            self._open = False
            self._stats.connection_closed()
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def _client_host(address: str) -> str:
    """The host a client should use to reach a socket bound to ``address``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.is_unspecified:
        return "127.0.0.1" if ip.version == 4 else "[::1]"
    return f"[{address}]" if ip.version == 6 else address


class FakeServer:
    """Serve ``fake`` on a real TCP socket; use as ``async with FakeServer(fake) as server``.

    Args:
        fake: The emulated account to serve.
        host: Interface to bind; use an IP address (``"127.0.0.1"``).
        port: Port to bind; ``0`` picks a free one (read it back from ``port``/``url``).
        shutdown_timeout: Seconds requests still running at ``close()`` (such as held
            long-polls) get before they are cancelled and their connections closed.
    """

    def __init__(
        self,
        fake: FakeParallel,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        shutdown_timeout: float = 0.1,
    ) -> None:
        self.fake = fake
        self.host = host
        self.port = port
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:54321``."""
        if self._url is None:
            raise RuntimeError("the server is not running; use 'async with FakeServer(...)'")
        return self._url

    async def start(self) -> None:
        """Bind the socket and start serving."""
        if self._runner is not None:
            raise RuntimeError("the server is already running")
        # handler_cancellation: a client hanging up ends its held long-poll at once.
        runner = web.AppRunner(
            self.fake.make_app(),
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        protocol_factory = runner.server
        if protocol_factory is None:  # pragma: no cover - setup() always sets it
            raise RuntimeError("aiohttp runner did not create a server")
        stats = self.fake.stats
        loop = asyncio.get_running_loop()
        try:
            listener = await loop.create_server(
                lambda: _CountingProtocol(protocol_factory(), stats), self.host, self.port
            )
        except BaseException as exc:
            failed: BaseException | None = exc
        else:
            failed = None
        if failed is not None:  # clean up outside the except block: no chained context
            await runner.cleanup()
            raise failed
        self._runner, self._listener = runner, listener
        address = listener.sockets[0].getsockname()
        self.port = int(address[1])
        self._url = f"http://{_client_host(str(address[0]))}:{self.port}"

    async def close(self) -> None:
        """Stop listening, end open requests and connections, run app cleanup."""
        runner, listener = self._runner, self._listener
        self._runner = self._listener = None
        self._url = None
        if listener is not None:
            listener.close()
        if runner is not None:
            # Closes every connection (after shutdown_timeout for busy ones), which
            # wait_closed() below waits for on Python 3.12+.
            await runner.cleanup()
        if listener is not None:
            await listener.wait_closed()

    async def __aenter__(self) -> FakeServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _announce(server: FakeServer) -> None:
    print(f"Fake Parallel API listening on {server.url} (Ctrl+C to stop)", flush=True)


def run_fake_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    api_key: str | None = "test-key",
    duration: float = 0.0,
    processor_durations: Mapping[str, float] | None = None,
    plan: PlanFunction | None = None,
    manual: bool = False,
    max_long_poll: float | None = None,
    create_rate_limit: tuple[int, float] | None = None,
    seed: int = 0,
    on_ready: Callable[[FakeServer], None] | None = _announce,
    fake: FakeParallel | None = None,
) -> None:
    """Serve a new ``FakeParallel`` until SIGINT (Ctrl+C) or SIGTERM; blocking, for the CLI.

    The keyword arguments configure the ``FakeParallel`` (see its documentation), unless
    ``fake`` is given ready-made; ``on_ready`` is called once the socket is bound (default:
    print the URL).
    """
    if fake is None:
        fake = FakeParallel(
            api_key=api_key,
            duration=duration,
            processor_durations=processor_durations,
            plan=plan,
            manual=manual,
            max_long_poll=max_long_poll,
            create_rate_limit=create_rate_limit,
            seed=seed,
        )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Not on Windows; there Ctrl+C arrives as KeyboardInterrupt instead.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop.set)
        try:
            async with FakeServer(fake, host, port) as server:
                if on_ready is not None:
                    on_ready(server)
                await stop.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(signum)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    fake.close()

"""A small aiohttp application served on 127.0.0.1 for tests that need a custom server."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from aiohttp import web


@contextmanager
def refused_port() -> Iterator[int]:
    """A port of 127.0.0.1 that refuses connections for as long as the block runs.

    The port stays bound (without listening) until the block ends: a port that is closed
    again at once could be taken by another test process meanwhile, which would answer.
    ``SO_REUSEADDR`` lets a server of this test (``FakeServer(port=...)``) listen on it.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free port of 127.0.0.1; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


Writer = Callable[[web.Request, web.StreamResponse, int], Awaitable[None]]


@asynccontextmanager
async def serve_stream(path: str, write: Writer) -> AsyncIterator[tuple[str, list[int]]]:
    """Serve an event stream at ``path``: ``await write(request, response, index)`` writes it.

    ``index`` counts the connections. Yields the base URL and a one-item list holding the
    number of connections so far. A client that leaves ends the handler (its write fails).
    """
    connections = [0]

    async def endpoint(request: web.Request) -> web.StreamResponse:
        index = connections[0]
        connections[0] += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await write(request, response, index)
            await response.write_eof()
        except ConnectionError:  # the client left
            pass
        return response

    app = web.Application()
    app.router.add_get(path, endpoint)
    async with serve_app(app) as url:
        yield url, connections

"""The client's connection bound: at most ``max_in_flight + 2`` sockets, closing ones included.

Why aiohttp's pool limit alone is not enough: the pool frees a connection's place the moment it
*asks* the transport to close (a request cancelled, timed out or broken), but asyncio closes
the socket on the loop's next turn (``call_soon``). Whoever takes the place first connects at
once, before the old socket's FIN leaves: a request queued in the pool (aiohttp wakes it
before it even asks for the close), or a result-hub worker whose long-poll was just cut to
free a slot (it takes its slot straight back and sends the fetch in the same step). The
server then sees both connections; with the result hub's preemptions, ``max_in_flight + 5``.

The gate counts a request (or event stream) from before it connects until its connection is
back in the pool, or, when it ended without handing it back, until the loop turn on which
asyncio closes the socket has run: the place is handed on by a callback queued after that
close. New sockets are only made when the pool has no idle one, so the sockets open at any
moment never exceed the gate's size. (Over TLS the ``close_notify`` is written at once too.)
The gate is sized as aiohttp's pool, and releases later than it, so nothing ever queues in
aiohttp (with its timeouts running): the queue is here, in arrival order.
"""

from __future__ import annotations

import asyncio

import anyio

__all__ = ["ConnectionGate"]


class ConnectionGate:
    """At most ``size`` requests and streams of a client on a connection at once."""

    __slots__ = ("_size", "_tokens")

    def __init__(self, size: int) -> None:
        self._size = size
        self._tokens = anyio.Semaphore(size)

    @property
    def in_use(self) -> int:
        """Places taken now (sockets closing included)."""
        return self._size - self._tokens.value

    def try_enter(self) -> bool:
        """Take a place if one is free now, without yielding to the loop."""
        try:
            self._tokens.acquire_nowait()
        except anyio.WouldBlock:
            return False
        return True

    async def enter(self) -> None:
        """Wait for a place (first come, first served)."""
        await self._tokens.acquire()

    def leave(self, *, closed: bool) -> None:
        """Hand the place on: now if the connection went back to the pool; if it was
        ``closed`` (or may have been), once the socket is gone (see the module doc)."""
        if closed:
            asyncio.get_running_loop().call_soon(self._tokens.release)
        else:
            self._tokens.release()

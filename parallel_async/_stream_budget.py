"""What one event stream call may spend across its connections: silence and failures.

A stream reconnects after a dropped or silent connection; without a budget for the whole call,
every reconnect would start afresh (each through the retry policy) and a server that answers
but never streams would keep a caller waiting for hours.
"""

from __future__ import annotations

import anyio

from ._defaults import MAX_RECONNECTS
from ._errors import DisconnectedError, ParallelError, TransportTimeoutError

__all__ = ["MAX_RECONNECTS", "StreamBudget"]


class StreamBudget:
    """What one stream call may still spend, across all its connections.

    * Silence: every read waits at most ``idle`` seconds for bytes (aiohttp's read timeout),
      the opening answer included. A connection that answered but then brings nothing at all
      ends the call with `TransportTimeoutError`: the server does not stream, and the next
      connection would do the same. One that falls silent after bringing data is resumed,
      like a dropped connection. An opening that times out is retried by the retry policy.
    * Failures: failed connections, and failed attempts at opening one, since the last
      progress; past `MAX_RECONNECTS` the last error is raised.
    * ``deadline`` (run streams' ``timeout``, on the anyio clock): the iteration ends there,
      without error.
    """

    __slots__ = ("deadline", "failures", "heard", "idle")

    def __init__(self, idle: float, deadline: float | None = None) -> None:
        self.idle = idle
        self.deadline = deadline
        self.failures = 0
        self.heard = False

    def connecting(self) -> None:
        """A new connection starts (it has heard nothing yet)."""
        self.heard = False

    def passed(self) -> bool:
        """The caller's deadline passed."""
        return self.deadline is not None and anyio.current_time() >= self.deadline

    def failed(self, exc: ParallelError) -> None:
        """Count a failed connection; raise ``exc`` when the call cannot go on."""
        if isinstance(exc, TransportTimeoutError) and not self.heard:
            raise exc
        self.failures += 1
        if self.failures > MAX_RECONNECTS:
            raise exc

    def ended_quietly(self, path: str) -> None:
        """The server closed a connection cleanly: one that brought no byte is a failure."""
        if not self.heard:
            self.failed(
                DisconnectedError(
                    f"GET {path} ended at once, without any data", method="GET", path=path
                )
            )

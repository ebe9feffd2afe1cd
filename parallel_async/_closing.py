"""The client's close notification: closing a client ends every wait that uses it, at once.

Closing the aiohttp session does not end a read that is waiting for bytes (the session detaches
it), so a stream or a long-poll would outlive its client and hang its caller. Instead, every
wait that may outlast the client runs inside `CloseSignal.watch`: `AsyncParallel.aclose`
cancels them all, and each raises `ClientClosedError` where it waited. Parts that must react
rather than be cut (a fan-out engine ending its outcomes) await `CloseSignal.wait` instead.

The request path watches every request (its retries and limiter waits included); event streams
watch each connection's opening, each read and each pause, never across a ``yield``.
"""

from __future__ import annotations

from types import TracebackType

import anyio

from ._errors import ClientClosedError

__all__ = ["CloseSignal"]


class CloseSignal:
    """Tells every wait of one client that the client is closing. Owned by `AsyncParallel`.

    Use ``with signal.watch("GET /v1/..."):`` around an await (in a coroutine or an async
    generator, but not across a ``yield``), or ``await signal.wait()`` in a task that reacts.
    """

    __slots__ = ("_closed", "_event", "_scopes")

    def __init__(self) -> None:
        self._closed = False
        self._scopes: set[anyio.CancelScope] = set()
        self._event: anyio.Event | None = None

    @property
    def closed(self) -> bool:
        """True once `close` ran."""
        return self._closed

    def close(self) -> None:
        """Cancel every watch and wake every waiter; idempotent (`AsyncParallel.aclose`)."""
        self._closed = True
        for scope in list(self._scopes):
            scope.cancel()
        if self._event is not None:
            self._event.set()

    def error(self, what: str = "") -> ClientClosedError:
        """The error of a wait that ``what`` describes (e.g. ``"GET /v1/tasks/runs/x"``)."""
        during = f" during {what}" if what else ""
        return ClientClosedError(f"the AsyncParallel was closed{during}")

    def watch(self, what: str = "") -> _Watch:
        """A context manager: its block is cancelled, raising `ClientClosedError`, on close.

        It raises at once when the client is already closed. An exception that escapes the
        block after the close began (a connection the close cut) becomes `ClientClosedError`
        too, chained from it; other cancellations pass through untouched.
        """
        return _Watch(self, what)

    async def wait(self) -> None:
        """Return once the client is closing (at once if it is closed already)."""
        if self._closed:
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


class _Watch:
    """One watched block (see `CloseSignal.watch`); a class, not a generator: it is on the
    path of every request."""

    __slots__ = ("_scope", "_signal", "_what")

    def __init__(self, signal: CloseSignal, what: str) -> None:
        self._signal = signal
        self._what = what
        self._scope: anyio.CancelScope | None = None

    def __enter__(self) -> None:
        signal = self._signal
        if signal._closed:
            raise signal.error(self._what)
        scope = self._scope = anyio.CancelScope()
        scope.__enter__()
        signal._scopes.add(scope)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        signal, scope = self._signal, self._scope
        assert scope is not None  # noqa: S101 - __enter__ ran
        signal._scopes.discard(scope)
        if scope.__exit__(exc_type, exc, tb):
            # the scope swallowed its own cancellation: only the close cancels it
            raise signal.error(self._what) from None
        if signal._closed and isinstance(exc, Exception) and not isinstance(exc, ClientClosedError):
            raise signal.error(self._what) from exc

"""The thin aiohttp edge: one function sends one request, one context manager maps its errors.

Nothing else in the package imports aiohttp's exceptions; everything above this module sees only
our own error types (see `parallel_async._errors`).
"""

from __future__ import annotations

import asyncio
import platform
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import NamedTuple

import aiohttp
import anyio
from multidict import CIMultiDictProxy

from ._connection_gate import ConnectionGate
from ._errors import (
    ClientClosedError,
    ConnectError,
    DisconnectedError,
    TransportError,
    TransportTimeoutError,
)
from ._version import __version__

USER_AGENT = (
    f"parallel-async/{__version__} (Python {platform.python_version()}; "
    f"aiohttp {aiohttp.__version__}; {sys.platform})"
)


class Response(NamedTuple):
    """One HTTP answer, fully read."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


def map_transport_errors(method: str, path: str) -> _MappedErrors:
    """Translate aiohttp's errors into ours, around a ``with`` block: the one place where that
    happens."""
    return _MappedErrors(method, path)


class _MappedErrors:
    """The context manager of `map_transport_errors` (a class, not a generator: it is on the
    path of every request).

    Order matters: the most specific classes come first because aiohttp's tree overlaps
    (a connect timeout is both a timeout and a connection error).
    """

    __slots__ = ("_method", "_path")

    def __init__(self, method: str, path: str) -> None:
        self._method = method
        self._path = path

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError):
            return
        method, path = self._method, self._path
        where = f"{method} {path}"
        error: TransportError
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            error = ConnectError(f"timed out connecting for {where}", method=method, path=path)
        elif isinstance(
            exc,
            aiohttp.ClientConnectorCertificateError
            | aiohttp.ClientSSLError
            | aiohttp.ServerFingerprintMismatch,
        ):
            # TLS failures are not transient: never retried, and verification is never off.
            error = TransportError(f"TLS error for {where}: {exc}", method=method, path=path)
        elif isinstance(exc, aiohttp.ClientConnectorError):
            error = ConnectError(
                f"cannot connect for {where}: {exc.os_error}", method=method, path=path
            )
        elif isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
            error = TransportTimeoutError(
                f"no answer in time for {where}", method=method, path=path
            )
        elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
            error = DisconnectedError(
                f"server disconnected during {where}", method=method, path=path
            )
        elif isinstance(exc, aiohttp.ClientOSError):
            error = DisconnectedError(
                f"connection lost during {where}: {exc}", method=method, path=path
            )
        else:
            error = TransportError(f"transport error for {where}: {exc}", method=method, path=path)
        raise error from exc


def _check_open(session: aiohttp.ClientSession, method: str, path: str) -> None:
    """Raise `ClientClosedError` for a closed session, instead of aiohttp's bare RuntimeError."""
    if session.closed:
        raise ClientClosedError(
            f"the aiohttp session is closed; cannot send {method} {path} (a session passed as "
            "session= must stay open until the AsyncParallel using it is closed)"
        )


UPLOAD_RATE = 64 * 1024
"""Bytes per second a request body may be sent at, at worst: each started 64 KiB of body adds
a second to a request's total bound (a 1,000-input ``add_runs`` may weigh megabytes)."""


def total_bound(read_timeout: float, connect_timeout: float, body_size: int = 0) -> float:
    """The most seconds one attempt of a request may take, from start to its last byte.

    A read timeout alone never ends an answer that trickles a byte at a time; this does. It is
    the read timeout (a long-poll's: its server wait plus a margin), plus the connect
    timeout, plus a second per started `UPLOAD_RATE` bytes of body. It also counts a wait for
    a free connection, which only happens with more requests open than the pool holds.
    """
    return read_timeout + connect_timeout + -(-body_size // UPLOAD_RATE)


class Transport:
    """Sends requests on an aiohttp session; knows nothing of retries or the API's semantics.

    ``max_connections`` bounds the sockets its requests and streams hold at once, closing ones
    included (`ConnectionGate`); ``None`` leaves the bound to the session's pool.
    """

    __slots__ = ("_base_url", "_connect_timeout", "_gate", "_session", "_timeouts")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        connect_timeout: float,
        max_connections: int | None = None,
    ):
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._connect_timeout = connect_timeout
        self._gate = None if max_connections is None else ConnectionGate(max_connections)
        self._timeouts: dict[tuple[float | None, int], aiohttp.ClientTimeout] = {}

    def _timeout(self, read_timeout: float | None, body_size: int = -1) -> aiohttp.ClientTimeout:
        """aiohttp's timeouts: of a request (its `total_bound`), or of a stream (``-1``:
        no total, a stream lasts as long as it streams)."""
        upload = -1 if body_size < 0 else -(-body_size // UPLOAD_RATE)
        key = (read_timeout, upload)
        timeout = self._timeouts.get(key)
        if timeout is None:
            total = None
            if read_timeout is not None and upload >= 0:
                total = total_bound(read_timeout, self._connect_timeout, max(0, body_size))
            timeout = aiohttp.ClientTimeout(
                total=total,
                connect=None,  # a pool wait is bounded by `total` (requests) or not at all
                sock_connect=self._connect_timeout,
                sock_read=read_timeout,
            )
            if len(self._timeouts) < 64:
                self._timeouts[key] = timeout
        return timeout

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        read_timeout: float | None,
    ) -> Response:
        """Send one request and read the whole answer, whatever its status.

        The attempt ends with `TransportTimeoutError` once it has taken its `total_bound`,
        however the server paces its answer.
        """
        _check_open(self._session, method, path)
        timeout = self._timeout(read_timeout, 0 if body is None else len(body))
        gate = self._gate
        if gate is not None and not gate.try_enter():
            timeout = await self._wait_for_gate(gate, timeout, method, path)
        closed = True  # unless the answer is read: then the connection is back in the pool
        try:
            with map_transport_errors(method, path):
                async with self._session.request(
                    method,
                    self._base_url + path,
                    params=params,
                    data=body,
                    headers=headers,
                    timeout=timeout,
                    allow_redirects=False,
                    raise_for_status=False,  # an injected session may raise; statuses are ours
                ) as resp:
                    response = Response(resp.status, resp.headers, await resp.read())
            closed = False
        finally:
            if gate is not None:
                gate.leave(closed=closed)
        return response

    @staticmethod
    async def _wait_for_gate(
        gate: ConnectionGate, timeout: aiohttp.ClientTimeout, method: str, path: str
    ) -> aiohttp.ClientTimeout:
        """Wait for a free connection within the attempt's total; what is left of it."""
        total = timeout.total
        if total is None:
            await gate.enter()
            return timeout
        started = asyncio.get_running_loop().time()
        with anyio.move_on_after(total):
            await gate.enter()
            left = total - (asyncio.get_running_loop().time() - started)
            return aiohttp.ClientTimeout(
                total=max(left, 0.001),
                connect=timeout.connect,
                sock_connect=timeout.sock_connect,
                sock_read=timeout.sock_read,
            )
        raise TransportTimeoutError(
            f"no connection free in time for {method} {path}", method=method, path=path
        )


class StreamResponse:
    """An open streaming answer: status and headers now, the body as it arrives."""

    __slots__ = ("_path", "_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, path: str) -> None:
        self._resp = resp
        self._path = path
        self.status = resp.status
        self.headers = resp.headers

    async def read(self) -> bytes:
        """The whole remaining body (for error answers)."""
        with map_transport_errors("GET", self._path):
            return await self._resp.read()

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; a dropped connection raises `DisconnectedError`."""
        with map_transport_errors("GET", self._path):
            async for chunk in self._resp.content.iter_any():
                yield chunk


@asynccontextmanager
async def open_stream(
    transport: Transport,
    path: str,
    *,
    headers: Mapping[str, str],
    params: Mapping[str, str] | None,
    read_timeout: float | None,
) -> AsyncIterator[StreamResponse]:
    """Open a streaming GET (server-sent events); the connection is released on exit."""
    _check_open(transport._session, "GET", path)
    gate = transport._gate
    if gate is not None and not gate.try_enter():
        await gate.enter()  # a stream has no total bound, nor has its wait
    try:
        with map_transport_errors("GET", path):
            resp = await transport._session.get(
                transport._base_url + path,
                params=params,
                headers=headers,
                timeout=transport._timeout(read_timeout),
                allow_redirects=False,
                raise_for_status=False,
            )
        try:
            yield StreamResponse(resp, path)
        finally:
            resp.close()  # a stream left early must not go back to the pool half-read
    finally:
        if gate is not None:
            gate.leave(closed=True)

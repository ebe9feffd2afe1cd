"""``AsyncParallel``: configuration, the aiohttp session's lifecycle, and the one request path."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from enum import Enum
from types import TracebackType
from typing import Protocol, TypeVar

import aiohttp
import anyio

from . import _defaults as defaults
from . import _enrich
from ._breaker import Breaker
from ._closing import CloseSignal
from ._deadline import check_seconds
from ._errors import (
    ClientClosedError,
    ClientStateError,
    InvalidArgumentError,
    MissingAPIKeyError,
    RateLimitError,
    WrongEventLoopError,
)
from ._fanout_api import FanoutMethods
from ._hub import ResultHub
from ._limiter import CreateLimiter
from ._models import TaskRun
from ._options import RequestOptions, call_deadline, request_options
from ._protocol import error_from_response, join_betas
from ._retry import RetryPolicy, call_with_retry
from ._task_group import TaskGroupResource
from ._task_run import TaskRunResource
from ._transport import USER_AGENT, Response, Transport
from ._webhook_receivers import WebhookResource
from ._webhooks import TaskRunStatusEvent, WebhookEvent

InputT = TypeVar("InputT")

__all__ = ["DEFAULT_BASE_URL", "AsyncParallel"]

DEFAULT_BASE_URL = defaults.BASE_URL
DEFAULT_MAX_IN_FLIGHT = defaults.MAX_IN_FLIGHT
DEFAULT_CREATE_RATE_LIMIT = defaults.CREATE_RATE_LIMIT
DEFAULT_READ_TIMEOUT = defaults.READ_TIMEOUT


class RunWatcher(Protocol):
    """A running fan-out that wants to hear run statuses learnt elsewhere."""

    def observe(self, run: TaskRun) -> None: ...


class Slot(Protocol):
    """A permit for one open request (the fan-out's ``max_in_flight`` bound)."""

    async def acquire(self) -> None: ...

    def release(self) -> None: ...


class _NoSlot:
    """The permit of a request outside any fan-out: always granted."""

    async def acquire(self) -> None:
        return None

    def release(self) -> None:
        return None


_NO_SLOT: Slot = _NoSlot()


class _Secret(str):
    """The API key: a ``str`` for aiohttp, but a repr that never shows it.

    So the key stays out of tracebacks that print local variables (Sentry, rich) and out of
    ``repr(vars(client))``, as well as out of our own messages.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<redacted>'"


def _retry_policy(retry: RetryPolicy | None, max_retries: int | None) -> RetryPolicy:
    if max_retries is None:
        return retry if retry is not None else RetryPolicy()
    if retry is not None:
        raise InvalidArgumentError("give retry=RetryPolicy(...) or max_retries, not both")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise InvalidArgumentError(f"max_retries must be an int >= 0, got {max_retries!r}")
    return RetryPolicy(attempts=max_retries + 1)


class _State(Enum):
    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


class AsyncParallel(FanoutMethods):
    """An asyncio client for Parallel's Task API, built for fan-out.

    Use it as an async context manager (or call `aclose`):

        async with AsyncParallel(max_in_flight=256) as client:
            run = await client.task_run.create(input="...", processor="base")
            result = await client.task_run.result(run.run_id)

    Args:
        api_key: the API key; defaults to ``PARALLEL_API_KEY``. Never printed or logged.
        base_url: defaults to ``PARALLEL_BASE_URL``, then ``https://api.parallel.ai``.
        max_in_flight: most requests open at once (the connection pool is sized to it).
        retry: the retry policy for transient failures (429, 5xx, dropped connections).
        create_rate_limit: most creates per ``create_rate_window`` seconds, client-wide
            (default 2,000 per minute, the API's limit); ``None`` disables the limiter.
        create_rate_window: the limiter's window in seconds.
        betas: ``parallel-beta`` values sent with every request.
        session: an aiohttp session to share; the client uses it but never closes it.
        connect_timeout: seconds to open a TCP/TLS connection.
        timeout: read timeout, seconds, of ordinary (not long-poll) requests; default 60.
            Each attempt is also bounded in total (read timeout + ``connect_timeout``, plus a
            second per 64 KiB of body), so a trickling answer cannot hold a call.
        max_retries: the official SDK's retry knob: retries after the first attempt
            (``RetryPolicy(attempts=max_retries + 1)``); give ``retry`` or this, not both.
        default_headers: headers sent with every request (not ``x-api-key``).
        webhook_secret: the secret that signs your webhooks (``whsec_...`` or the raw secret, or
            a list during a rotation); defaults to ``PARALLEL_WEBHOOK_SECRET``. Used by
            ``client.webhooks``; never printed or logged.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        retry: RetryPolicy | None = None,
        create_rate_limit: int | None = DEFAULT_CREATE_RATE_LIMIT,
        create_rate_window: float = defaults.CREATE_RATE_WINDOW,
        betas: Sequence[str] | None = None,
        session: aiohttp.ClientSession | None = None,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        timeout: float | None = None,
        max_retries: int | None = None,
        default_headers: Mapping[str, str] | None = None,
        webhook_secret: str | Sequence[str] | None = None,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get("PARALLEL_API_KEY")
        if not key:
            raise MissingAPIKeyError(
                "no API key: pass AsyncParallel(api_key=...) or set PARALLEL_API_KEY"
            )
        url = base_url or os.environ.get("PARALLEL_BASE_URL") or DEFAULT_BASE_URL
        if not url.startswith(("https://", "http://")):
            raise InvalidArgumentError(f"base_url must start with https:// or http://: {url!r}")
        if (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise InvalidArgumentError(
                f"max_in_flight must be a positive int, got {max_in_flight!r}"
            )
        check_seconds("connect_timeout", connect_timeout, allow_none=False)
        self.base_url = url.rstrip("/")
        self.max_in_flight = max_in_flight
        self.retry_policy = _retry_policy(retry, max_retries)
        check_seconds("timeout", timeout)
        self._read_timeout = DEFAULT_READ_TIMEOUT if timeout is None else float(timeout)
        join_betas(betas)  # validate early: a bad value fails here, not on the first request
        self._betas: tuple[str, ...] = tuple(betas or ())
        self._create_limiter = CreateLimiter(create_rate_limit, create_rate_window)
        self._connect_timeout = connect_timeout
        self._owns_session = session is None
        self._session = session
        self._transport: Transport | None = None
        self._slots: anyio.CapacityLimiter | None = None
        self._hub: ResultHub | None = None
        self._entered = False
        self._state = _State.UNOPENED
        self._closing = CloseSignal()  # every wait that may outlast the client watches it
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it was opened on
        self._breaker = Breaker()  # fails fast while connections keep failing
        self._base_headers: dict[str, str] = {
            "x-api-key": _Secret(key),
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        extra = request_options(default_headers, None, None)
        if extra is not None:
            self._base_headers = extra.apply_headers(self._base_headers)
        self._headers_cache: dict[str, dict[str, str]] = {}
        # the hot path (every /result of a fan-out): no per-call betas, no body
        self._plain_headers = self._build_headers(None, json_body=False)
        self.task_run = TaskRunResource(self)
        """Task runs: ``create``, ``retrieve``, ``result``, ``retrieve_input``, ``events``."""
        self.task_group = TaskGroupResource(self)
        """Task groups: ``create``, ``retrieve``, ``add_runs``, ``events``, ``get_runs``, ..."""
        self._watchers: set[RunWatcher] = set()  # running fan-outs, told what webhooks say
        self._expecting: dict[str, asyncio.TimerHandle] = {}  # runs awaiting their webhook
        self.webhooks = WebhookResource(webhook_secret, sink=self._on_webhook)
        """Webhooks: ``unwrap``, ``on_event``, ``feed``, ``aiohttp_handler``, ``asgi_app``."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, "
            f"max_in_flight={self.max_in_flight}, state={self._state.value!r})"
        )

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncParallel:
        if self._state is _State.CLOSED:
            raise ClientClosedError("this AsyncParallel is closed; create a new client")
        if self._entered:
            raise ClientStateError("this AsyncParallel is already in an `async with` block")
        self._entered = True
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_loop(self) -> None:
        """Bind the client to the running event loop, or refuse another one.

        An aiohttp session belongs to its loop: used from another it fails deep in aiohttp
        (or aborts the process under uvloop), so we fail first, saying what to do.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside any loop: nothing to bind to yet
            return
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise WrongEventLoopError(
                "this AsyncParallel was opened on another event loop, and its connections "
                "belong to that loop: create one client per event loop (e.g. inside the "
                "coroutine you pass to asyncio.run() or anyio.run(), or one per thread), and "
                "close it on its own loop"
            )

    def _open(self) -> Transport:
        self._check_loop()  # on every request and stream: a cheap identity check
        if self._transport is not None:
            return self._transport
        if self._state is _State.CLOSED:
            raise ClientClosedError("this AsyncParallel is closed; create a new client")
        if self._session is None:
            # Pool sized as the transport's connection gate, which releases later (a closed
            # socket counts until it is gone): nothing queues inside aiohttp with its timeouts
            # running. TLS verification stays on (aiohttp's default).
            connector = aiohttp.TCPConnector(
                limit=self.max_in_flight + 2, limit_per_host=0, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        self._transport = Transport(
            self._session, self.base_url, self._connect_timeout, self.max_in_flight + 2
        )
        self._state = _State.OPENED
        return self._transport

    async def aclose(self) -> None:
        """Close the client: every request, stream and fan-out still using it ends at once
        with `ClientClosedError`; then its own aiohttp session (never an injected one) is
        closed. Idempotent."""
        if self._state is _State.CLOSED:
            return
        if self._transport is not None:
            self._check_loop()  # its session can only be closed on its own loop
        self._state = _State.CLOSED
        self._closing.close()  # before the session: a closed session does not end a read
        for timer in self._expecting.values():
            timer.cancel()
        self._expecting.clear()
        hub, self._hub = self._hub, None
        with anyio.CancelScope(shield=True):  # even when called from a watched block
            if hub is not None:  # waiters end with ClientClosedError before the session goes
                await hub.aclose()
            await self.webhooks.aclose()  # async on_event callbacks still running: cancelled
        session, self._session, self._transport = self._session, None, None
        if session is not None and self._owns_session:
            with anyio.CancelScope(shield=True):  # even when called from a watched block
                await session.close()

    @property
    def is_closed(self) -> bool:
        """True once `aclose` ran."""
        return self._state is _State.CLOSED

    # --- the one request path -------------------------------------------------------------------

    @property
    def betas(self) -> tuple[str, ...]:
        """``parallel-beta`` values sent with every request (settable)."""
        return self._betas

    @betas.setter
    def betas(self, value: Sequence[str] | None) -> None:
        join_betas(value)  # a bad value fails here
        self._betas = tuple(value or ())
        self._headers_cache.clear()
        self._plain_headers = self._build_headers(None, json_body=False)

    def _headers(self, betas: Sequence[str] | None, *, json_body: bool) -> dict[str, str]:
        if not betas and not json_body:
            return self._plain_headers
        return self._build_headers(betas, json_body=json_body)

    def _build_headers(self, betas: Sequence[str] | None, *, json_body: bool) -> dict[str, str]:
        beta = join_betas(self._betas, betas)
        cache_key = f"{beta}|{json_body}"
        headers = self._headers_cache.get(cache_key)
        if headers is None:
            headers = dict(self._base_headers)
            if beta:
                headers["parallel-beta"] = beta
            if json_body:
                headers["Content-Type"] = "application/json"
            if len(self._headers_cache) < 32:
                self._headers_cache[cache_key] = headers
        return headers

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        betas: Sequence[str] | None = None,
        read_timeout: float | None = None,
        idempotent: bool = True,
        is_create: bool = False,
        deadline: float | None = None,
        accept: frozenset[int] = frozenset(),
        slot: Slot | None = None,
        options: RequestOptions | None = None,
        timeout: float | None = None,
        watch_close: bool = True,
    ) -> Response:
        """Send a request through the retry policy; return 2xx (and ``accept``) answers.

        Every other status raises its typed error. ``is_create`` routes the request through the
        client-wide create limiter, and a 429 on it pauses every create. ``slot`` is held only
        while a request is open: never while waiting for the limiter or between retries.
        ``options`` are the SDK's per-call extras; ``timeout`` bounds the whole call (attempts
        and waits), raising `TransportTimeoutError` when it passes. ``watch_close=False`` is for
        callers that end themselves when the client closes (a fan-out's poll workers): it
        spares every request a cancel scope.
        """
        transport = self._open()
        if read_timeout is None:
            read_timeout = self._read_timeout
        headers = self._headers(betas, json_body=body is not None)
        if options is not None:
            headers = options.apply_headers(headers)
            path = options.apply_query(path)
            body = options.apply_body(body)
        limiter = self._create_limiter if is_create else None
        permit = _NO_SLOT if slot is None else slot

        async def once() -> Response:
            breaker = self.retry_policy.circuit_breaker
            if limiter is not None:
                self._breaker.check(breaker, method, path)  # not queued to fail later
                await limiter.acquire(deadline)
            await permit.acquire()
            try:
                with self._breaker.attempt(breaker, method, path):
                    resp = await transport.request(
                        method,
                        path,
                        headers=headers,
                        params=params,
                        body=body,
                        read_timeout=read_timeout,
                    )
            finally:
                permit.release()
            if 200 <= resp.status < 300 or resp.status in accept:
                return resp
            err = error_from_response(resp.status, resp.headers, resp.body)
            if limiter is not None and isinstance(err, RateLimitError):
                limiter.pause(err.retry_after if err.retry_after is not None else 1.0)
            raise err

        # aclose() ends the request, its retries and its waits; the breaker opening ends
        # a retry wait (the next attempt then fails fast)
        wake = self._breaker.opened
        if not watch_close and timeout is None:
            return await call_with_retry(
                self.retry_policy, once, idempotent=idempotent, deadline=deadline, wake=wake
            )
        with self._closing.watch(f"{method} {path}"):
            if timeout is None:
                return await call_with_retry(
                    self.retry_policy, once, idempotent=idempotent, deadline=deadline, wake=wake
                )
            with call_deadline(timeout, f"{method} {path}", lambda cut: cut) as end:
                # ``once`` reads ``deadline`` when it runs: the limiter gives up early, not cut
                deadline = end if deadline is None or end is None else min(deadline, end)
                return await call_with_retry(
                    self.retry_policy, once, idempotent=idempotent, deadline=deadline, wake=wake
                )

    def _fanout_slots(self) -> anyio.CapacityLimiter:
        """The client-wide limit on fan-out requests (shared by every fan-out of this client)."""
        if self._slots is None:
            self._slots = anyio.CapacityLimiter(self.max_in_flight)
        return self._slots

    def _on_webhook(self, event: WebhookEvent) -> None:
        """A verified, new webhook: its run's status wakes whoever awaits that run."""
        if isinstance(event, TaskRunStatusEvent):
            self._observe_run(event.data)

    def _expect_webhook(self, run_id: str) -> None:
        """A run was created with a webhook: while this client receives webhooks, its
        ``result()`` waiters wait for the event; from ``webhooks.poll_after`` on, they check
        the run's status that often (a lost webhook is overdue once the run has ended)."""
        if (
            not self.webhooks.has_secret
            or self._state is _State.CLOSED
            or run_id in self._expecting
        ):
            return
        self._result_hub().follow((run_id,))
        loop = asyncio.get_running_loop()
        self._expecting[run_id] = loop.call_later(
            self.webhooks.poll_after, self._webhook_late, run_id
        )

    def _webhook_late(self, run_id: str) -> None:
        """No webhook within ``poll_after`` (or it came): waiters of the run check its status."""
        timer = self._expecting.pop(run_id, None)
        if timer is not None:
            timer.cancel()
            if self._hub is not None:
                self._hub.unfollow((run_id,), check_every=self.webhooks.poll_after)

    def _observe_run(self, run: TaskRun, *, source: object = None) -> None:
        """A run's status learnt outside a request of ours (a webhook, a group stream):
        the result hub and every running fan-out hear it (``source`` excepted)."""
        if self._hub is not None:
            self._hub.observe(run)
        if run.is_terminal and run.run_id in self._expecting:
            self._webhook_late(run.run_id)  # it ended: a later result() just fetches it
        for watcher in list(self._watchers):
            if watcher is not source:
                watcher.observe(run)

    def _result_hub(self) -> ResultHub:
        """The tracker every ``task_run.result()`` and ``execute()`` of this client joins."""
        if self._hub is None:
            self._hub = ResultHub(self)
        return self._hub

    # --- enrichment -----------------------------------------------------------------------------

    enrich = _enrich.enrich
    """Enrich a table: one run per row, answered once even across crashes (`Enrichment`)."""

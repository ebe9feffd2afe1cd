"""``AsyncParallel``: configuration, the aiohttp session's lifecycle, and the one request path."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from enum import Enum
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
import anyio

from . import _enrich, _fanout, _group_tracking
from ._errors import (
    ClientClosedError,
    InvalidArgumentError,
    MissingAPIKeyError,
    RateLimitError,
)
from ._fanout import DEFAULT_POLL_INTERVAL, FanoutOptions
from ._limiter import CreateLimiter
from ._models import Metadata, SourcePolicy, TaskAdvancedSettings, TaskSpec, Webhook
from ._options import RequestOptions, call_deadline, request_options
from ._outcomes import Outcome, Outcomes
from ._progress import ProgressCallback
from ._protocol import error_from_response, join_betas
from ._retry import RetryPolicy, call_with_retry
from ._task_group import TaskGroupResource
from ._task_run import TaskRunResource
from ._transport import USER_AGENT, Response, Transport

InputT = TypeVar("InputT")

__all__ = ["DEFAULT_BASE_URL", "AsyncParallel"]

DEFAULT_BASE_URL = "https://api.parallel.ai"
DEFAULT_MAX_IN_FLIGHT = 100
DEFAULT_CREATE_RATE_LIMIT = 2000  # creates per minute: the API's documented limit
DEFAULT_READ_TIMEOUT = 60.0


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


class AsyncParallel:
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
        max_retries: the official SDK's retry knob: retries after the first attempt
            (``RetryPolicy(attempts=max_retries + 1)``); give ``retry`` or this, not both.
        default_headers: headers sent with every request (not ``x-api-key``).
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        retry: RetryPolicy | None = None,
        create_rate_limit: int | None = DEFAULT_CREATE_RATE_LIMIT,
        create_rate_window: float = 60.0,
        betas: Sequence[str] | None = None,
        session: aiohttp.ClientSession | None = None,
        connect_timeout: float = 10.0,
        timeout: float | None = None,
        max_retries: int | None = None,
        default_headers: Mapping[str, str] | None = None,
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
        if connect_timeout <= 0:
            raise InvalidArgumentError("connect_timeout must be positive")
        self.base_url = url.rstrip("/")
        self.max_in_flight = max_in_flight
        self.retry_policy = _retry_policy(retry, max_retries)
        if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
            raise InvalidArgumentError("timeout must be a positive number of seconds or None")
        self._read_timeout = DEFAULT_READ_TIMEOUT if timeout is None else float(timeout)
        join_betas(betas)  # validate early: a bad value fails here, not on the first request
        self._betas: tuple[str, ...] = tuple(betas or ())
        try:
            self._create_limiter = CreateLimiter(create_rate_limit, create_rate_window)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        self._connect_timeout = connect_timeout
        self._owns_session = session is None
        self._session = session
        self._transport: Transport | None = None
        self._slots: anyio.CapacityLimiter | None = None
        self._entered = False
        self._state = _State.UNOPENED
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
            raise RuntimeError("this AsyncParallel is already in an `async with` block")
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

    def _open(self) -> Transport:
        if self._transport is not None:
            return self._transport
        if self._state is _State.CLOSED:
            raise ClientClosedError("this AsyncParallel is closed; create a new client")
        if self._session is None:
            # Connector sized to the fan-out width: requests never queue inside aiohttp with
            # their timeouts running. TLS verification stays on (aiohttp's default).
            connector = aiohttp.TCPConnector(
                limit=self.max_in_flight + 2, limit_per_host=0, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        self._transport = Transport(self._session, self.base_url, self._connect_timeout)
        self._state = _State.OPENED
        return self._transport

    async def aclose(self) -> None:
        """Close the client's own aiohttp session (never an injected one). Idempotent."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        session, self._session, self._transport = self._session, None, None
        if session is not None and self._owns_session:
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
    ) -> Response:
        """Send a request through the retry policy; return 2xx (and ``accept``) answers.

        Every other status raises its typed error. ``is_create`` routes the request through the
        client-wide create limiter, and a 429 on it pauses every create. ``slot`` is held only
        while a request is open: never while waiting for the limiter or between retries.
        ``options`` are the SDK's per-call extras; ``timeout`` bounds the whole call (attempts
        and waits), raising `TransportTimeoutError` when it passes.
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
            if limiter is not None:
                await limiter.acquire(deadline)
            await permit.acquire()
            try:
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

        if timeout is None:
            return await call_with_retry(
                self.retry_policy, once, idempotent=idempotent, deadline=deadline
            )
        with call_deadline(timeout, f"{method} {path}", lambda cut: cut) as end:
            # ``once`` reads ``deadline`` when it runs: the limiter gives up early, not cut
            deadline = end if deadline is None or end is None else min(deadline, end)
            return await call_with_retry(
                self.retry_policy, once, idempotent=idempotent, deadline=deadline
            )

    def _fanout_slots(self) -> anyio.CapacityLimiter:
        """The client-wide limit on fan-out requests (shared by every fan-out of this client)."""
        if self._slots is None:
            self._slots = anyio.CapacityLimiter(self.max_in_flight)
        return self._slots

    # --- fan-out --------------------------------------------------------------------------------

    def as_completed(
        self,
        run_ids: Iterable[str],
        *,
        group: str | None = None,
        timeout: float | None = None,
        run_timeout: float | None = None,
        poll_interval: int = DEFAULT_POLL_INTERVAL,
        fail_fast: bool = False,
        progress: ProgressCallback | None = None,
        betas: Sequence[str] | None = None,
    ) -> AbstractAsyncContextManager[Outcomes[None]]:
        """Await existing runs; outcomes arrive as runs finish.

            async with client.as_completed(run_ids, timeout=3600) as outcomes:
                async for o in outcomes:
                    print(o.run_id, o.result if o.ok else o.error)

        Args:
            run_ids: the runs (checked before any request).
            group: the task group these runs belong to: completions are then learnt from the
                group's event stream (one connection) instead of a long-poll per run.
            timeout: one deadline for the whole fan-out, seconds; runs still active then end
                as `RunTimeoutError` outcomes.
            run_timeout: a deadline per run, seconds from when it starts being tracked.
            poll_interval: server long-poll (whole seconds) while many runs wait for a slot;
                polls lengthen as that backlog shrinks (see the fan-out guide).
            fail_fast: raise the first run error out of the ``async with`` block (and cancel
                the rest) instead of yielding it as an outcome.
            progress: called with a `Progress` snapshot after every change.
            betas: ``parallel-beta`` values for the requests.

        Leaving the block early cancels every in-flight request and releases its connection.
        """
        options = FanoutOptions(
            timeout=timeout,
            run_timeout=run_timeout,
            poll_interval=poll_interval,
            fail_fast=fail_fast,
            progress=progress,
            betas=betas,
        )
        if group is not None:
            return _group_tracking.as_completed_group(self, run_ids, group, options)
        return _fanout.as_completed(self, run_ids, options)

    async def gather(
        self,
        run_ids: Iterable[str],
        *,
        timeout: float | None = None,
        run_timeout: float | None = None,
        poll_interval: int = DEFAULT_POLL_INTERVAL,
        fail_fast: bool = False,
        progress: ProgressCallback | None = None,
        betas: Sequence[str] | None = None,
    ) -> list[Outcome[None]]:
        """Await existing runs; return their outcomes in the order of ``run_ids``.

        Same arguments as `as_completed`.
        """
        options = FanoutOptions(
            timeout=timeout,
            run_timeout=run_timeout,
            poll_interval=poll_interval,
            fail_fast=fail_fast,
            progress=progress,
            betas=betas,
        )
        return await _fanout.gather(self, run_ids, options)

    def map(
        self,
        inputs: Iterable[InputT] | AsyncIterable[InputT],
        *,
        processor: str,
        task_spec: TaskSpec | Mapping[str, Any] | str | None = None,
        metadata: Metadata | None = None,
        source_policy: SourcePolicy | Mapping[str, Any] | None = None,
        advanced_settings: TaskAdvancedSettings | Mapping[str, Any] | None = None,
        enable_events: bool | None = None,
        webhook: Webhook | Mapping[str, Any] | None = None,
        output: Any = None,
        input_type: Any = None,
        strategy: Literal["group", "poll"] = "group",
        timeout: float | None = None,
        run_timeout: float | None = None,
        poll_interval: int = DEFAULT_POLL_INTERVAL,
        fail_fast: bool = False,
        progress: ProgressCallback | None = None,
        betas: Sequence[str] | None = None,
    ) -> AbstractAsyncContextManager[Outcomes[InputT]]:
        """Create one run per input and await them all; outcomes arrive as runs finish.

            async with client.map(companies, processor="base", task_spec=spec) as outcomes:
                async for o in outcomes:
                    print(o.index, o.input, o.result.output.content if o.ok else o.error)

        Each input is a run's ``input`` (a string or a dict), or a whole `RunInput`.
        ``output`` (a msgspec Struct, dataclass or TypedDict type) replaces ``task_spec`` and
        fills each outcome's ``parsed`` with a ``ParsedTaskRunResult`` (the typed value is
        ``o.parsed.output.parsed``); ``input_type`` sets the input schema.
        The other create arguments apply to every run and are checked before any request; a
        bad input becomes an `InvalidArgumentError` outcome for that input alone.
        Creates go through the client's rate limiter; a create is never repeated when it may
        have reached the server, so no input gets two runs. ``inputs`` may be lazy (any
        iterable or async iterable): it is read as creates proceed.

        ``strategy`` chooses how completions are learnt: ``"group"`` (default) creates the runs
        in a task group, in requests of up to 1,000, and follows the group's event stream on one
        connection, fetching each finished run's result; ``"poll"`` creates runs one by one and
        long-polls each run's ``/result`` with rotation. The fan-out arguments are those of
        `as_completed`; ``timeout`` also bounds the creates.
        """
        if isinstance(inputs, str | bytes | Mapping):
            raise InvalidArgumentError("inputs must be an iterable of inputs, not a single input")
        if strategy not in ("group", "poll"):
            raise InvalidArgumentError(f"strategy must be 'group' or 'poll', got {strategy!r}")
        create_kwargs = {
            "processor": processor,
            "task_spec": task_spec,
            "metadata": metadata,
            "source_policy": source_policy,
            "advanced_settings": advanced_settings,
            "enable_events": enable_events,
            "webhook": webhook,
            "output": output,
            "input_type": input_type,
        }
        run = _group_tracking.map_group if strategy == "group" else _fanout.map_inputs
        options = FanoutOptions(
            timeout=timeout,
            run_timeout=run_timeout,
            poll_interval=poll_interval,
            fail_fast=fail_fast,
            progress=progress,
            betas=betas,
        )
        return run(self, inputs, create_kwargs, options)

    # --- enrichment -----------------------------------------------------------------------------

    enrich = _enrich.enrich
    """Enrich a table: one run per row, answered once even across crashes (`Enrichment`)."""

"""The task-run resource: ``create``, ``retrieve``, ``retrieve_input`` and the blocking ``result``.

Names and signatures mirror the official SDK's ``client.task_run`` so that code written against
``parallel.AsyncParallel`` runs with only the import changed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, overload

import anyio

from . import _defaults as defaults
from ._deadline import check_seconds
from ._errors import (
    InvalidArgumentError,
    NotFoundError,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    RunTimeoutError,
)
from ._models import (
    AutoSchema,
    JsonSchema,
    McpServer,
    Metadata,
    RunInput,
    SourcePolicy,
    TaskAdvancedSettings,
    TaskRun,
    TaskRunResult,
    TaskSpec,
    TextSchema,
    Webhook,
)
from ._options import RequestOptions, call_options, request_options
from ._protocol import (
    TASK_RUN_DECODER,
    TASK_RUN_RESULT_DECODER,
    build_run_input,
    decode,
    decode_run_input,
    encode,
    validate_id,
)
from ._schema import output_type_of
from ._streams import EventStream, run_event_stream
from ._typed import ParsedTaskRunResult, parse_output
from ._webhooks import webhook_betas

if TYPE_CHECKING:
    from ._client import AsyncParallel, Slot
    from ._events import RunEvent

__all__ = ["TaskRunResource"]

T = TypeVar("T")
OutputSpec: TypeAlias = str | Mapping[str, Any] | JsonSchema | TextSchema | AutoSchema | TaskSpec
"""An ``output`` that describes the result without a type to decode it into."""

DEFAULT_API_TIMEOUT = defaults.API_TIMEOUT
DEFAULT_RESULT_TIMEOUT = defaults.RESULT_TIMEOUT
LONG_POLL_READ_MARGIN = defaults.LONG_POLL_READ_MARGIN  # patched in tests
_RESULT_ACCEPT = frozenset({404, 408})


def check_timeouts(api_timeout: object, timeout: object) -> None:
    """Validate ``result()``'s two timeouts before any request."""
    if isinstance(api_timeout, bool) or not isinstance(api_timeout, int) or api_timeout < 1:
        raise InvalidArgumentError(
            "api_timeout is the server long-poll in whole seconds (an int >= 1), "
            f"got {api_timeout!r}"
        )
    check_seconds("timeout", timeout, meaning="the total client deadline")


class TaskRunResource:
    """``client.task_run``: create runs, read their status, input and result."""

    __slots__ = ("_client",)

    def __init__(self, client: AsyncParallel) -> None:
        self._client = client

    async def create(
        self,
        *,
        input: str | Mapping[str, Any],
        processor: str,
        advanced_settings: TaskAdvancedSettings | Mapping[str, Any] | None = None,
        enable_events: bool | None = None,
        mcp_servers: Sequence[McpServer | Mapping[str, Any]] | None = None,
        memory_scope_key: str | None = None,
        metadata: Metadata | None = None,
        previous_interaction_id: str | None = None,
        source_policy: SourcePolicy | Mapping[str, Any] | None = None,
        task_spec: TaskSpec | Mapping[str, Any] | str | None = None,
        webhook: Webhook | Mapping[str, Any] | None = None,
        betas: Sequence[str] | None = None,
        output: Any = None,
        input_type: Any = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> TaskRun:
        """Create a task run; returns at once with the run ``queued``.

        Arguments are checked before anything is sent. The request is retried only when the
        server provably did not process it (connection refused, 429, 503), so a retry can never
        create a second run; any other failure is raised.

        ``output`` may replace ``task_spec``: a msgspec Struct, dataclass or TypedDict type (its
        JSON schema is built once and cached), a text description or a schema; ``input_type``
        likewise sets the input schema. Decode the result with ``result(run_id, output=T)``.

        ``extra_headers``, ``extra_query`` and ``extra_body`` (merged into the JSON body) and
        ``timeout`` (seconds for the whole call) are the official SDK's per-call options.
        """
        body = build_run_input(
            input=input,
            processor=processor,
            metadata=metadata,
            task_spec=task_spec,
            source_policy=source_policy,
            advanced_settings=advanced_settings,
            previous_interaction_id=previous_interaction_id,
            mcp_servers=mcp_servers,
            enable_events=enable_events,
            webhook=webhook,
            memory_scope_key=memory_scope_key,
            output=output,
            input_type=input_type,
        )
        options = call_options(extra_headers, extra_query, extra_body, timeout)
        betas = webhook_betas(body.webhook, betas)  # a webhook needs its beta on the create
        run = await self._create(body, betas, options=options, timeout=timeout)
        if body.webhook is not None:
            self._client._expect_webhook(run.run_id)
        return run

    @overload
    async def execute(
        self,
        *,
        input: str | Mapping[str, Any],
        processor: str,
        metadata: Metadata | None = None,
        output: type[T],
        input_type: Any = None,
        timeout: float | None = DEFAULT_RESULT_TIMEOUT,
        betas: Sequence[str] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        **create_kwargs: Any,
    ) -> ParsedTaskRunResult[T]: ...

    @overload
    async def execute(
        self,
        *,
        input: str | Mapping[str, Any],
        processor: str,
        metadata: Metadata | None = None,
        output: OutputSpec | None = None,
        input_type: Any = None,
        timeout: float | None = DEFAULT_RESULT_TIMEOUT,
        betas: Sequence[str] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        **create_kwargs: Any,
    ) -> TaskRunResult: ...

    async def execute(
        self,
        *,
        input: str | Mapping[str, Any],
        processor: str,
        metadata: Metadata | None = None,
        output: Any = None,
        input_type: Any = None,
        timeout: float | None = DEFAULT_RESULT_TIMEOUT,
        betas: Sequence[str] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        **create_kwargs: Any,
    ) -> Any:
        """Create a run and wait for its result, in one call (like the official ``execute``).

        With an ``output`` type the result is a `ParsedTaskRunResult` whose
        ``output.parsed`` holds the typed value (``OutputValidationError`` when the content does
        not fit, the untyped result still reachable on the error); otherwise a
        `TaskRunResult`. ``timeout`` is the deadline for the whole call.
        """
        options = request_options(extra_headers, extra_query, extra_body)
        deadline = None if timeout is None else time.monotonic() + timeout
        body = build_run_input(
            input=input,
            processor=processor,
            metadata=metadata,
            output=output,
            input_type=input_type,
            **create_kwargs,
        )
        try:
            with anyio.fail_after(timeout):
                create_betas = webhook_betas(body.webhook, betas)
                run = await self._create(body, create_betas, deadline, options=options)
                if body.webhook is not None:
                    self._client._expect_webhook(run.run_id)
        except TimeoutError as exc:  # cut mid-create (the limiter fails earlier by itself)
            if isinstance(exc, RunTimeoutError):
                raise
            raise RunTimeoutError(run_id="", last_status=None, timeout=timeout) from None
        remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
        return await self.result(
            run.run_id,
            timeout=remaining,
            betas=betas,
            output=output,
            extra_headers=extra_headers,
            extra_query=extra_query,
        )

    async def _create(
        self,
        body: RunInput,
        betas: Sequence[str] | None,
        deadline: float | None = None,
        slot: Slot | None = None,
        *,
        options: RequestOptions | None = None,
        timeout: float | None = None,
    ) -> TaskRun:
        resp = await self._client._request(
            "POST",
            "/v1/tasks/runs",
            body=encode(body),
            betas=betas,
            idempotent=False,
            is_create=True,
            deadline=deadline,
            slot=slot,
            options=options,
            timeout=timeout,
        )
        return decode(TASK_RUN_DECODER, resp.status, resp.body)

    async def retrieve(
        self,
        run_id: str,
        *,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> TaskRun:
        """The run's current status (no output: see `result`).

        The keyword arguments are the official SDK's per-call options (``timeout``: seconds
        for the whole call).
        """
        path = f"/v1/tasks/runs/{validate_id(run_id)}"
        options = call_options(extra_headers, extra_query, extra_body, timeout)
        resp = await self._client._request("GET", path, options=options, timeout=timeout)
        return decode(TASK_RUN_DECODER, resp.status, resp.body)

    async def retrieve_input(
        self,
        run_id: str,
        *,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> RunInput:
        """The request the run was created with (keyword arguments as for `retrieve`)."""
        path = f"/v1/tasks/runs/{validate_id(run_id)}/input"
        options = call_options(extra_headers, extra_query, extra_body, timeout)
        resp = await self._client._request("GET", path, options=options, timeout=timeout)
        return decode_run_input(resp.status, resp.body)

    async def events(
        self,
        run_id: str,
        *,
        timeout: float | None = None,
        betas: Sequence[str] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
    ) -> EventStream[RunEvent]:
        """The run's event stream: state changes, progress messages and stats.

        The API closes a run's stream after about 570 s and replays past events on reconnect;
        this stream reconnects transparently and drops the replayed duplicates, until the run
        reaches a terminal state (its last event carries the output when completed) or
        ``timeout`` seconds pass. Use ``async for event in await client.task_run.events(id)``.

        ``extra_headers`` and ``extra_query`` (official SDK options) go with every
        (re)connection; ``extra_body`` is accepted and ignored (a GET sends no body).
        """
        validate_id(run_id)
        check_seconds("timeout", timeout)
        options = request_options(extra_headers, extra_query, extra_body)
        return run_event_stream(self._client, run_id, timeout=timeout, betas=betas, options=options)

    @overload
    async def result(
        self,
        run_id: str,
        *,
        api_timeout: int = DEFAULT_API_TIMEOUT,
        timeout: float | None = DEFAULT_RESULT_TIMEOUT,
        betas: Sequence[str] | None = None,
        output: type[T],
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
    ) -> ParsedTaskRunResult[T]: ...

    @overload
    async def result(
        self,
        run_id: str,
        *,
        api_timeout: int = DEFAULT_API_TIMEOUT,
        timeout: float | None = DEFAULT_RESULT_TIMEOUT,
        betas: Sequence[str] | None = None,
        output: OutputSpec | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
    ) -> TaskRunResult: ...

    async def result(
        self,
        run_id: str,
        *,
        api_timeout: int = DEFAULT_API_TIMEOUT,
        timeout: float | None = DEFAULT_RESULT_TIMEOUT,
        betas: Sequence[str] | None = None,
        output: Any = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
    ) -> Any:
        """Wait for the run and return its result.

        Every ``result()`` (and ``execute()``) on a client joins the client's result hub:
        calls awaiting the same run share one request, all share the client's
        ``max_in_flight`` slots with any fan-out, and runs still going never hold a slot
        while other callers' results are ready (see the fan-out guide, "result() in web
        apps"). Cancelling a call (a client disconnect) affects no other call.

        Args:
            run_id: the run.
            api_timeout: the longest server long-poll of a request, whole seconds (``timeout``
                query parameter); the hub's polls last at most 30 s, less while other calls
                wait for slots. A 408 ("still running") is never surfaced: we ask again.
            timeout: the client deadline for the whole call, seconds (``None``: no deadline).
            betas: ``parallel-beta`` values for this call.
            output: a type to decode the JSON content into; the call then returns a
                `ParsedTaskRunResult` (``result.output.parsed``).
            extra_headers: extra headers for each ``/result`` request (official SDK option).
            extra_query: extra query parameters for each ``/result`` request.
            extra_body: accepted for the official SDK's signature; a GET sends no body.

        Raises:
            RunTimeoutError: the deadline passed first (also a builtin ``TimeoutError``).
            RunFailedError: the run failed; carries the run's error object.
            RunCancelledError: the run was cancelled.
            RunNotFoundError: there is no such run.
        """
        validate_id(run_id)
        check_timeouts(api_timeout, timeout)
        options = request_options(extra_headers, extra_query, extra_body)
        client = self._client
        client._open()  # a closed client says so before anything else
        if timeout == math.inf:
            timeout = None
        result = await client._result_hub().wait(
            run_id, api_timeout=api_timeout, timeout=timeout, betas=betas, options=options
        )
        typ = output_type_of(output)
        return result if typ is None else parse_output(result, typ)

    async def _poll(
        self,
        run_id: str,
        wait: int,
        betas: Sequence[str] | None,
        deadline: float | None,
        slot: Slot | None = None,
        *,
        options: RequestOptions | None = None,
        watch_close: bool = True,
    ) -> tuple[TaskRunResult | None, str | None]:
        """One ``/result`` request of at most ``wait`` seconds (``watch_close``: see
        `AsyncParallel._request`).

        Returns ``(result, "completed")``, or ``(None, last_status)`` while the run is active;
        raises a `RunError` when the run ended without a result.
        """
        client = self._client
        resp = await client._request(
            "GET",
            # the query is in the path: cheaper for yarl than a params mapping per request
            f"/v1/tasks/runs/{run_id}/result?timeout={wait}",
            betas=betas,
            read_timeout=wait + LONG_POLL_READ_MARGIN,
            deadline=deadline,
            accept=_RESULT_ACCEPT,
            slot=slot,
            options=options,
            watch_close=watch_close,
        )
        status = resp.status
        if status == 408:
            return None, None
        if status == 200:
            return decode(TASK_RUN_RESULT_DECODER, 200, resp.body), "completed"
        # 404 is "failed or not found": the run's status tells which.
        run = await self._status_after_404(run_id, deadline, slot, options=options)
        if run.status == "failed":
            raise RunFailedError(run_id=run_id, run=run, error=run.error)
        if run.status == "cancelled":
            raise RunCancelledError(f"run {run_id} was cancelled", run_id=run_id, run=run)
        if run.status != "completed":  # active after a 404: don't hammer a confused server
            await anyio.sleep(0.5)
        return None, run.status  # completed in between, or active: poll again

    async def _status_after_404(
        self,
        run_id: str,
        deadline: float | None,
        slot: Slot | None = None,
        *,
        options: RequestOptions | None = None,
    ) -> TaskRun:
        """The run's status (``GET`` the run); `RunNotFoundError` when there is no such run."""
        try:
            resp = await self._client._request(
                "GET", f"/v1/tasks/runs/{run_id}", deadline=deadline, slot=slot, options=options
            )
        except NotFoundError as exc:
            raise RunNotFoundError(f"no run {run_id}", run_id=run_id) from exc
        return decode(TASK_RUN_DECODER, resp.status, resp.body)

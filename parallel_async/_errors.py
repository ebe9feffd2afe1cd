"""The exception tree of parallel-async.

Every error we raise derives from `ParallelError`:

    ParallelError
    ├── InvalidArgumentError (also ValueError)   bad input, raised before any request
    │   ├── SchemaError                          a type that cannot become an API schema: path
    │   └── FieldSpecError                       a bad output field spec, with its position
    ├── MissingAPIKeyError (also ValueError)     no key given and PARALLEL_API_KEY unset
    ├── ClientStateError (also RuntimeError)     the client used against its state
    │   ├── ClientClosedError                    the aiohttp session (or client) is closed
    │   └── WrongEventLoopError                  the client is used on another event loop
    ├── TransportError                           the request got no HTTP answer
    │   ├── ConnectError                         could not connect (the server never saw it)
    │   │   └── APIUnreachableError              failing fast: connections keep failing
    │   ├── TransportTimeoutError (TimeoutError) no answer within the HTTP timeout
    │   └── DisconnectedError                    the connection dropped mid-exchange
    ├── APIStatusError                           a non-2xx answer: status, headers, body, ref_id
    │   ├── BadRequestError                      400
    │   ├── AuthenticationError                  401
    │   ├── PaymentRequiredError                 402
    │   ├── PermissionDeniedError                403
    │   ├── NotFoundError                        404
    │   ├── ConflictError                        409
    │   ├── UnprocessableEntityError             422
    │   ├── RateLimitError                       429, with retry_after
    │   └── InternalServerError                  5xx
    ├── DecodeError                              a 2xx body that does not decode: status, body
    │   └── EventTooLargeError                   a stream line or event over the size limit
    ├── OutputValidationError                    an output that does not fit your type: result
    ├── AddRunsError                             add_runs failed part-way: run_ids created so far
    ├── WebhookVerificationError                 a webhook delivery failed verification
    ├── JournalError                             an enrichment journal cannot be used
    ├── ClusterError                             a Spark/Dask job's coordinator said no
    ├── MissingDependencyError (ImportError)     an optional extra is not installed
    ├── RunError                                 a run ended without a result: run_id
    │   ├── RunFailedError                       the run failed: its error object
    │   ├── RunCancelledError                    the run was cancelled
    │   ├── RunNotFoundError                     no such run
    │   └── RunTimeoutError (TimeoutError)       the deadline passed; the run goes on: last status
    │       └── CreateTimeoutError               ... before the run was created: nothing billed
    └── LedgerError (also AssertionError)        a bug of ours: an impossible run transition

A timeout says which it is: `RunTimeoutError` (the run exists and is still going; its
``timeout`` is the run's or the fan-out's), `CreateTimeoutError` (no run was created), or
`TransportTimeoutError` (the call's own ``timeout``, or one request's HTTP timeout, passed).

``APIStatusError`` and ``DecodeError`` keep the raw body so nothing the server said is lost. No
error message or repr ever contains the API key: requests' headers are never stored here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._models import ErrorObject, TaskRun, TaskRunResult

__all__ = [
    "APIStatusError",
    "APIUnreachableError",
    "AddRunsError",
    "AuthenticationError",
    "BadRequestError",
    "BatchError",
    "ClientClosedError",
    "ClientStateError",
    "ClusterError",
    "ConflictError",
    "ConnectError",
    "CreateTimeoutError",
    "DecodeError",
    "DisconnectedError",
    "EventTooLargeError",
    "FieldSpecError",
    "InternalServerError",
    "InvalidArgumentError",
    "JournalError",
    "LedgerError",
    "MissingAPIKeyError",
    "MissingDependencyError",
    "NotFoundError",
    "OutputValidationError",
    "ParallelError",
    "PaymentRequiredError",
    "PermissionDeniedError",
    "RateLimitError",
    "RunCancelledError",
    "RunError",
    "RunFailedError",
    "RunNotFoundError",
    "RunTimeoutError",
    "SchemaError",
    "StreamReadError",
    "TransportError",
    "TransportTimeoutError",
    "UnprocessableEntityError",
    "WebhookVerificationError",
    "WrongEventLoopError",
]

_BODY_PREVIEW = 500


def _preview(body: bytes | str) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return text if len(text) <= _BODY_PREVIEW else text[:_BODY_PREVIEW] + "…"


class ParallelError(Exception):
    """Base class of every error raised by parallel-async."""


class InvalidArgumentError(ParallelError, ValueError):
    """An argument is invalid; raised before any request is sent."""


class FieldSpecError(InvalidArgumentError):
    """An output field spec (``"ceo, founded int: year founded"``) that does not parse.

    Attributes:
        spec: the text that was parsed (one ``--field`` entry, or the whole spec).
        position: 0-based character offset of the problem in ``spec`` (``None``: no one
            place).
        entry: 1-based number of the offending field entry (``None`` likewise).
    """

    def __init__(
        self,
        message: str,
        *,
        spec: str | None = None,
        position: int | None = None,
        entry: int | None = None,
    ) -> None:
        text = message
        if spec is not None and position is not None:
            line_start = spec.rfind("\n", 0, position) + 1
            line_end = spec.find("\n", position)
            line = spec[line_start : None if line_end < 0 else line_end]
            column = position - line_start
            text = (
                f"bad field spec at column {column + 1} (field {entry}): {message}\n"
                f"  {line}\n  {' ' * column}^"
            )
        super().__init__(text)
        self.spec = spec
        self.position = position
        self.entry = entry


class MissingAPIKeyError(ParallelError, ValueError):
    """No API key was given and ``PARALLEL_API_KEY`` is not set."""


class ClientStateError(ParallelError, RuntimeError):
    """The client was used in a way its state does not allow (e.g. entered twice)."""


class ClientClosedError(ClientStateError):
    """A request was attempted on a closed aiohttp session (or a closed client).

    Typically an injected ``session=`` was closed by its owner while the client still used it.
    Never retried: nothing was sent, and no retry could succeed.
    """


class WrongEventLoopError(ClientStateError):
    """The client was used on an event loop other than the one it was opened on.

    Its aiohttp session (connections, timers) belongs to that loop; using it from another
    fails in aiohttp or, under uvloop, aborts the process. Create one client per event loop
    (inside the coroutine given to ``asyncio.run`` / ``anyio.run``, or one per thread), and
    close it on its own loop. Nothing was sent.
    """


class TransportError(ParallelError):
    """The request got no HTTP answer.

    Attributes:
        method: HTTP method of the request.
        path: URL path of the request (no query, no credentials).
    """

    def __init__(self, message: str, *, method: str = "", path: str = "") -> None:
        super().__init__(message)
        self.method = method
        self.path = path


class ConnectError(TransportError):
    """Could not open a connection; the server never received the request."""


class APIUnreachableError(ConnectError):
    """Failed at once, not sent: the client's circuit breaker is open.

    Connection attempts kept failing with no answer in between (see `CircuitBreaker`), so
    for a cool-down every request fails fast with this error instead of spending its retries;
    then one request probes the API again. Never retried: nothing was sent.
    """


class TransportTimeoutError(TransportError, TimeoutError):
    """No answer arrived within the HTTP timeout."""


class DisconnectedError(TransportError):
    """The connection dropped after the request was (maybe) sent.

    For a create, the run may or may not exist: this error is surfaced, never retried blindly.
    """


class APIStatusError(ParallelError):
    """The API answered with a non-2xx status.

    Attributes:
        status: HTTP status code (also readable as ``status_code``, the official SDK's name).
        headers: response headers.
        body: raw response body.
        message: the API's error message (or a preview of the body).
        ref_id: the API's reference id for the error, to quote to support.
        detail: the API's error detail object, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        ref_id: str | None = None,
        detail: Any = None,
    ) -> None:
        super().__init__(f"{status}: {message}" + (f" (ref_id {ref_id})" if ref_id else ""))
        self.status = status
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        self.body = body
        self.message = message
        self.ref_id = ref_id
        self.detail = detail

    @property
    def status_code(self) -> int:
        """The HTTP status code: the official SDK's name for `status`."""
        return self.status

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, message={self.message!r})"


class BadRequestError(APIStatusError):
    """400: the request is malformed."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or invalid."""


class PaymentRequiredError(APIStatusError):
    """402: not enough credit (in-flight runs reserve credit too)."""


class PermissionDeniedError(APIStatusError):
    """403: e.g. an invalid processor."""


class NotFoundError(APIStatusError):
    """404: not found (on ``/result``: failed or unknown; see `RunError`)."""


class ConflictError(APIStatusError):
    """409: conflict."""


class UnprocessableEntityError(APIStatusError):
    """422: the request failed validation; ``detail`` names the fields."""


class RateLimitError(APIStatusError):
    """429: too many requests.

    Attributes:
        retry_after: seconds the server asked us to wait, if it said.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class InternalServerError(APIStatusError):
    """5xx: the server failed."""


class DecodeError(ParallelError):
    """A successful answer whose body does not decode into the expected type.

    Attributes:
        status: HTTP status code.
        body: the raw body, kept whole.
    """

    def __init__(self, message: str, *, status: int, body: bytes) -> None:
        super().__init__(f"{message}; status {status}, body: {_preview(body)!r}")
        self.status = status
        self.body = body


class EventTooLargeError(DecodeError):
    """An event stream sent a line (or an event) longer than the limit, without ending it.

    The stream is not resumed: the same line would be downloaded again on every reconnect.

    Attributes:
        limit: the limit, in bytes.
        path: the stream's URL path (empty when raised by the decoder alone).
        body: the first bytes of the line (at most 1,024), not the whole of it.
    """

    def __init__(self, message: str, *, limit: int, body: bytes, path: str = "") -> None:
        super().__init__(message, status=200, body=body[:1024])
        self.limit = limit
        self.path = path


class AddRunsError(ParallelError):
    """``add_runs`` failed after some of its inputs became runs; the cause is chained.

    Attributes:
        run_ids: one entry per input, in order: the run id, or ``None`` if it has no run (or
            none we know of: see ``unresolved``).
        tags: each input's ``pa_tag`` metadata value, in input order: how to find its run
            later (``event.run.metadata["pa_tag"]`` in the group's events or ``get_runs``).
        unresolved: positions of the inputs that may or may not have become runs: their
            answer was lost and the group could not be read to tell. Every other ``None`` in
            ``run_ids`` is an input that was not created.
        duplicates: input position -> extra run ids created for it (a lost request that the
            server finished after the input was sent again). The API cannot cancel runs.
    """

    def __init__(
        self,
        message: str,
        *,
        run_ids: list[str | None],
        tags: Sequence[str] = (),
        unresolved: Iterable[int] = (),
        duplicates: Mapping[int, list[str]] | None = None,
    ) -> None:
        known = sum(r is not None for r in run_ids)
        self.unresolved = tuple(sorted(unresolved))
        if self.unresolved:
            detail = (
                f"{known} of {len(run_ids)} inputs are runs; whether "
                f"{len(self.unresolved)} others were created is unknown"
            )
        else:
            detail = f"{known} of {len(run_ids)} inputs were created"
        super().__init__(f"{message} ({detail})")
        self.run_ids = run_ids
        self.tags = tuple(tags)
        self.duplicates = dict(duplicates or {})


class WebhookVerificationError(ParallelError):
    """A webhook delivery is not authentic or not readable: bad or missing signature headers,
    a signature that matches no secret, a timestamp outside the tolerance, a body that is not the
    JSON it claims. The message says which; it never contains a secret.
    """


class JournalError(ParallelError):
    """An enrichment journal cannot be opened or used: unreadable, not a journal, in use
    by another process, or written by a newer version. The message says which file."""


class ClusterError(ParallelError):
    """A Spark or Dask enrichment task cannot go on: its job's coordinator (the Dask actor or
    the Spark driver's service) cannot be reached, or a newer attempt of the same partition
    took over (the engine re-ran the task). The engine's own task retry is the way forward."""


class MissingDependencyError(ParallelError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class RunError(ParallelError):
    """A run ended without a result.

    Attributes:
        run_id: the run.
        run: the run's last known status object, when we have it.
    """

    def __init__(self, message: str, *, run_id: str, run: TaskRun | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.run = run


class RunFailedError(RunError):
    """The run failed.

    Attributes:
        error: the run's error object (message, ref_id, detail).
    """

    def __init__(self, *, run_id: str, run: TaskRun | None, error: ErrorObject | None) -> None:
        reason = error.message if error is not None and error.message else "no reason given"
        super().__init__(f"run {run_id} failed: {reason}", run_id=run_id, run=run)
        self.error = error


class RunCancelledError(RunError):
    """The run was cancelled."""


class RunNotFoundError(RunError):
    """The API knows no run with this id."""


class RunTimeoutError(RunError, TimeoutError):
    """The client deadline passed before the run finished; the run itself goes on.

    Attributes:
        last_status: the run's status when we gave up (``None`` if never seen).
    """

    def __init__(self, *, run_id: str, last_status: str | None, timeout: float | None) -> None:
        after = f" after {timeout:g} s" if timeout is not None else ""
        if run_id:
            message = (
                f"run {run_id} still {last_status or 'unfinished'}{after}; it goes on "
                "server-side, call result() again to keep waiting"
            )
        else:
            message = (
                f"the deadline passed{after} before this input's run was created (if its "
                "create was in flight, the run may exist)"
            )
        super().__init__(message, run_id=run_id)
        self.last_status = last_status
        self.timeout = timeout


class CreateTimeoutError(RunTimeoutError):
    """The deadline passed before this input's run was created: nothing was started or billed.

    (If a create or add was on the wire when the deadline cut it, and its answer was lost, the
    run may exist: ``map`` then keeps looking for it by tag until its settle period ends.)
    """

    def __init__(self, *, timeout: float | None) -> None:
        super().__init__(run_id="", last_status=None, timeout=timeout)


class LedgerError(ParallelError, AssertionError):
    """A bug in this library: a run was moved in a way its phase does not allow.

    Raised loudly (never a silent hang). Please report it with the traceback.
    """


class SchemaError(InvalidArgumentError):
    """A type cannot become a schema the API accepts.

    Attributes:
        path: the offending field, e.g. ``Company.address.zip``.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class OutputValidationError(ParallelError):
    """A run's output does not decode into the requested type; nothing is lost.

    Attributes:
        content: the raw output content (a dict, or the text of a text output).
        path: where decoding failed, msgspec-style (``$.address.zip``); ``$`` is the root.
        field: the same path without ``$.`` (``address.zip``), empty for the root.
        result: the untyped `TaskRunResult`, still usable.
        run_id: the run.
        output_type: the type that was asked for.
    """

    def __init__(self, message: str, *, result: TaskRunResult, path: str, output_type: Any) -> None:
        super().__init__(f"run {result.run.run_id}: {message}")
        self.result = result
        self.content: Any = result.output.content
        self.path = path
        self.field = path[2:] if path.startswith("$.") else ""
        self.run_id = result.run.run_id
        self.output_type = output_type


# --- internal: caught inside the library, never raised to callers --------------------------


class BatchError(ParallelError):
    """One batch failed for good: what it made is in ``found``, ``unresolved`` is unknown."""

    def __init__(
        self,
        cause: ParallelError,
        found: dict[str, str],
        *,
        unresolved: Iterable[str] = (),
        read_error: ParallelError | None = None,
    ) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.found = found
        self.unresolved = set(unresolved)
        self.read_error = read_error


class StreamReadError(ParallelError):
    """A runs stream reported an ``error`` event: that read may have missed runs."""

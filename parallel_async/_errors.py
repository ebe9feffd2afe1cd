"""The exception tree of parallel-async.

Every error we raise derives from `ParallelError`:

    ParallelError
    ├── InvalidArgumentError (also ValueError)   bad input, raised before any request
    │   └── FieldSpecError                       a bad output field spec, with its position
    ├── MissingAPIKeyError (also ValueError)     no key given and PARALLEL_API_KEY unset
    ├── ClientClosedError (also RuntimeError)    the aiohttp session (or client) is closed
    ├── TransportError                           the request got no HTTP answer
    │   ├── ConnectError                         could not connect (the server never saw it)
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
    ├── AddRunsError                             add_runs failed part-way: run_ids created so far
    ├── JournalError                             an enrichment journal cannot be used
    ├── ClusterError                             a Spark/Dask job's coordinator said no
    ├── MissingDependencyError (ImportError)     an optional extra is not installed
    └── RunError                                 a run ended without a result: run_id
        ├── RunFailedError                       the run failed: its error object
        ├── RunCancelledError                    the run was cancelled
        ├── RunNotFoundError                     no such run
        └── RunTimeoutError (TimeoutError)       the client deadline passed first: last status

``APIStatusError`` and ``DecodeError`` keep the raw body so nothing the server said is lost. No
error message or repr ever contains the API key: requests' headers are never stored here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._models import ErrorObject, TaskRun

__all__ = [
    "APIStatusError",
    "AddRunsError",
    "AuthenticationError",
    "BadRequestError",
    "ClientClosedError",
    "ClusterError",
    "ConflictError",
    "ConnectError",
    "DecodeError",
    "DisconnectedError",
    "FieldSpecError",
    "InternalServerError",
    "InvalidArgumentError",
    "JournalError",
    "MissingAPIKeyError",
    "MissingDependencyError",
    "NotFoundError",
    "ParallelError",
    "PaymentRequiredError",
    "PermissionDeniedError",
    "RateLimitError",
    "RunCancelledError",
    "RunError",
    "RunFailedError",
    "RunNotFoundError",
    "RunTimeoutError",
    "TransportError",
    "TransportTimeoutError",
    "UnprocessableEntityError",
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


class ClientClosedError(ParallelError, RuntimeError):
    """A request was attempted on a closed aiohttp session (or a closed client).

    Typically an injected ``session=`` was closed by its owner while the client still used it.
    Never retried: nothing was sent, and no retry could succeed.
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

"""Per-call request options of the official SDK: ``extra_headers / extra_query / extra_body``.

Accepted so that code written against ``parallel.AsyncParallel`` runs with only the import
changed. Checks the values once and applies them to a request's headers, path and body; and
bounds a whole call that makes several requests by its ``timeout`` (`call_deadline`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple
from urllib.parse import urlencode

import anyio
import msgspec

from ._deadline import check_seconds
from ._errors import InvalidArgumentError, ParallelError, TransportTimeoutError

__all__ = ["RequestOptions", "call_deadline", "call_options", "request_options"]


class RequestOptions(NamedTuple):
    """What a call adds to its request(s)."""

    headers: Mapping[str, str] | None
    query: Mapping[str, object] | None
    body: Mapping[str, object] | None

    def apply_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` with the extra ones (a copy: the client's shared dicts stay intact)."""
        if not self.headers:
            return headers
        return {**headers, **self.headers}

    def apply_query(self, path: str) -> str:
        """``path`` with the extra query parameters appended."""
        if not self.query:
            return path
        query = urlencode({k: _query_value(v) for k, v in self.query.items()})
        return f"{path}{'&' if '?' in path else '?'}{query}"

    def apply_params(self, params: Mapping[str, str]) -> Mapping[str, str]:
        """``params`` with the extra query parameters added; ``params`` win (a stream's cursor)."""
        if not self.query:
            return params
        return {**{str(k): _query_value(v) for k, v in self.query.items()}, **params}

    def apply_body(self, body: bytes | None) -> bytes | None:
        """A JSON object body with the extra fields merged in (top level; extra ones win)."""
        if not self.body or body is None:
            return body
        merged: dict[str, Any] = msgspec.json.decode(body)
        merged.update(self.body)
        return msgspec.json.encode(merged)


def _query_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def request_options(
    extra_headers: Mapping[str, str] | None,
    extra_query: Mapping[str, object] | None,
    extra_body: Mapping[str, object] | None,
) -> RequestOptions | None:
    """Check the SDK's per-call extras; ``None`` when there are none (the common case)."""
    if extra_headers is None and extra_query is None and extra_body is None:
        return None
    for name, value in (
        ("extra_headers", extra_headers),
        ("extra_query", extra_query),
        ("extra_body", extra_body),
    ):
        if value is not None and not isinstance(value, Mapping):
            raise InvalidArgumentError(f"{name} must be a mapping, got {type(value).__name__}")
    if extra_headers is not None:
        bad = [
            k for k, v in extra_headers.items() if not isinstance(k, str) or not isinstance(v, str)
        ]
        if bad:
            raise InvalidArgumentError(f"extra_headers names and values must be strings: {bad!r}")
        if any(k.lower() == "x-api-key" for k in extra_headers):
            raise InvalidArgumentError(
                "extra_headers may not set x-api-key: pass api_key to AsyncParallel instead"
            )
    if extra_body is not None:
        try:
            msgspec.json.encode(extra_body)
        except TypeError as exc:
            raise InvalidArgumentError(f"extra_body must be JSON-serialisable: {exc}") from None
    return RequestOptions(extra_headers, extra_query, extra_body)


def call_options(
    extra_headers: Mapping[str, str] | None,
    extra_query: Mapping[str, object] | None,
    extra_body: Mapping[str, object] | None,
    timeout: object,
) -> RequestOptions | None:
    """`request_options`, and check the ``timeout`` of a non-stream call (whole-call seconds)."""
    check_seconds("timeout", timeout, meaning="the call's deadline")
    return request_options(extra_headers, extra_query, extra_body)


@contextmanager
def call_deadline(
    timeout: float | None,
    what: str,
    on_timeout: Callable[[TransportTimeoutError], ParallelError],
) -> Iterator[float | None]:
    """Bound a call of several requests by ``timeout`` seconds; yields its deadline.

    The deadline (``time.monotonic()``) is for the requests' limiter and retry waits, which
    give up early rather than be cut. When the timeout cuts the call, ``on_timeout`` turns a
    `TransportTimeoutError` into the error raised (chained from it).
    """
    if timeout is None:
        yield None
        return
    deadline = time.monotonic() + timeout
    try:
        with anyio.fail_after(timeout):
            yield deadline
    except TimeoutError as exc:
        if isinstance(exc, ParallelError):  # a request's own timeout, already typed
            raise
        cut = TransportTimeoutError(f"{what} did not finish within {timeout:g} s")
        raise on_timeout(cut) from cut

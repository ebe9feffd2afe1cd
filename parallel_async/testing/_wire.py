"""Wire format of the fake: JSON encoding, ``ErrorResponse`` bodies and timestamps.

Everything that turns Python values into response bytes lives here so handlers stay
small and every error body has the spec's shape
``{"type": "error", "error": {"ref_id", "message", "detail"}}``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import msgspec
from aiohttp import web

__all__ = [
    "FORBIDDEN_PROCESSOR",
    "INVALID_BODY",
    "RATE_LIMITED",
    "RESULT_NOT_FOUND",
    "RUN_NOT_FOUND",
    "TASKGROUP_NOT_FOUND",
    "TIMED_OUT",
    "UNAUTHORIZED",
    "VALIDATION_ERROR",
    "encode",
    "error_body",
    "error_response",
    "json_response",
    "malformed_response",
    "message_for_status",
    "new_ref_id",
    "rfc3339",
    "validation_response",
]

# Messages as the official OpenAPI document words them.
UNAUTHORIZED = "Unauthorized: invalid or missing credentials"
FORBIDDEN_PROCESSOR = "Forbidden: invalid processor in request"
INVALID_BODY = "Unprocessable content: request validation error"
VALIDATION_ERROR = "Request validation error"
RATE_LIMITED = "Too many requests: quota temporarily exceeded"
RUN_NOT_FOUND = "Run id not found"
RESULT_NOT_FOUND = "Run failed or run id not found"
TIMED_OUT = "Request timed out; run still active"
TASKGROUP_NOT_FOUND = "TaskGroup not found"

_STATUS_MESSAGES: dict[int, str] = {
    400: "Bad request",
    401: UNAUTHORIZED,
    402: "Payment required: insufficient credit in account",
    403: "Forbidden",
    404: "Not found",
    408: TIMED_OUT,
    409: "Conflict",
    422: INVALID_BODY,
    429: RATE_LIMITED,
    500: "Internal server error",
    502: "Bad gateway: upstream error",
    503: "Service unavailable",
    504: "Gateway timeout",
}

_encoder = msgspec.json.Encoder()
encode = _encoder.encode

# One shared header mapping: aiohttp copies it into each response's own multidict.
_JSON_HEADERS: Mapping[str, str] = {"Content-Type": "application/json"}

# A body that starts like a TaskRun but is cut off: valid UTF-8, invalid JSON.
_MALFORMED_BODY = b'{"run_id": "trun_00000000000000000000000000000000", "status": "comp'


def new_ref_id() -> str:
    """Return a fresh error reference id (UUID4 text, like the real service)."""
    return str(uuid.uuid4())


def rfc3339(timestamp: float) -> str:
    """Format a POSIX timestamp as RFC 3339 with microseconds and ``Z``."""
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def message_for_status(status: int) -> str:
    """Return the message the fake uses for an injected error ``status``."""
    return _STATUS_MESSAGES.get(status, f"HTTP {status}")


def error_body(message: str, detail: Mapping[str, Any] | None = None) -> bytes:
    """Encode an ``ErrorResponse`` body with a fresh ``ref_id``."""
    error = {"ref_id": new_ref_id(), "message": message, "detail": detail}
    return encode({"type": "error", "error": error})


def json_response(
    body: bytes, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Wrap already-encoded JSON ``body`` in a response."""
    response = web.Response(body=body, status=status, headers=_JSON_HEADERS)
    if headers:
        response.headers.update(headers)
    return response


def error_response(
    status: int,
    message: str,
    detail: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """Build a non-2xx response carrying an ``ErrorResponse`` body."""
    return json_response(error_body(message, detail), status=status, headers=headers)


def malformed_response() -> web.Response:
    """Return a 200 whose body claims to be JSON but does not parse."""
    return json_response(_MALFORMED_BODY)


def validation_response(errors: list[Any]) -> web.Response:
    """A 422 in FastAPI's ``HTTPValidationError`` shape, as the task-group endpoints use."""
    return json_response(encode({"detail": errors}), status=422)

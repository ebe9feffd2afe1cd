"""The pure core: request building, argument checks and response decoding. No I/O here.

Everything in this module works on plain values (status, headers, bytes), so it is tested without
a server and reused by every transport path.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from ._errors import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DecodeError,
    InternalServerError,
    InvalidArgumentError,
    NotFoundError,
    PaymentRequiredError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from ._models import (
    McpServer,
    RunInput,
    SourcePolicy,
    TaskAdvancedSettings,
    TaskRun,
    TaskRunResult,
    TaskSpec,
    Webhook,
)
from ._schema import output_task_spec

T = TypeVar("T")

# Decoders are built once: msgspec compiles a decoder per type on construction.
TASK_RUN_DECODER = msgspec.json.Decoder(TaskRun)
TASK_RUN_RESULT_DECODER = msgspec.json.Decoder(TaskRunResult)
RUN_INPUT_DECODER = msgspec.json.Decoder(RunInput)
_ANY_DECODER = msgspec.json.Decoder()
ENCODER = msgspec.json.Encoder()

# Ids go into URL paths: allow only what an id can hold, so nothing can traverse or inject.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")
METADATA_KEY_MAX = 16
METADATA_VALUE_MAX = 512

_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: PaymentRequiredError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
}


def validate_id(value: object, what: str = "run_id") -> str:
    """Return ``value`` if it is a well-formed id, else raise `InvalidArgumentError`."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidArgumentError(
            f"{what} must be a non-empty id of letters, digits, '_' or '-' (at most 128), "
            f"like 'trun_9907962f83aa4d9d98fd7f4bf745d654'; got {value!r}"
        )
    return value


def join_betas(*groups: Sequence[str] | None) -> str | None:
    """The ``parallel-beta`` header value: all betas, comma-joined, de-duplicated in order."""
    seen: dict[str, None] = {}
    for group in groups:
        if group is None:
            continue
        if isinstance(group, str):
            raise InvalidArgumentError(f"betas must be a list of strings, not a string: {group!r}")
        for beta in group:
            if not isinstance(beta, str) or not beta or "," in beta:
                raise InvalidArgumentError(f"each beta must be a non-empty string: {beta!r}")
            seen[beta] = None
    return ",".join(seen) or None


def _convert(value: object, typ: type[T], what: str) -> T:
    if isinstance(typ, type) and isinstance(value, typ):
        return value
    try:
        return msgspec.convert(value, typ)
    except msgspec.ValidationError as exc:
        raise InvalidArgumentError(f"{what}: {exc}") from None


def _normalize_schema(value: object) -> object:
    # Official SDK users may leave "type" out of a schema dict; infer it as the API does.
    if isinstance(value, Mapping) and "type" not in value:
        if "json_schema" in value:
            return {**value, "type": "json"}
        return {**value, "type": "text"}
    return value


def convert_task_spec(task_spec: object) -> TaskSpec:
    """Accept a `TaskSpec`, a dict in the API's shape, or a bare output description."""
    if isinstance(task_spec, TaskSpec):
        return task_spec
    if isinstance(task_spec, str):
        return TaskSpec(output_schema=task_spec)
    if isinstance(task_spec, Mapping):
        spec = dict(task_spec)
        if "output_schema" in spec:
            spec["output_schema"] = _normalize_schema(spec["output_schema"])
        if spec.get("input_schema") is not None:
            spec["input_schema"] = _normalize_schema(spec["input_schema"])
        task_spec = spec
    return _convert(task_spec, TaskSpec, "task_spec")


def check_metadata(metadata: object) -> dict[str, str | int | float | bool] | None:
    """Validate metadata against the API's limits, so a bad value fails before any request."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidArgumentError(f"metadata must be a dict, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or len(key) > METADATA_KEY_MAX:
            raise InvalidArgumentError(
                f"metadata key {key!r} must be a string of 1 to {METADATA_KEY_MAX} characters"
            )
        if not isinstance(value, str | int | float | bool):
            raise InvalidArgumentError(
                f"metadata[{key!r}] must be a string, number or boolean, got {type(value).__name__}"
            )
        if isinstance(value, str) and len(value) > METADATA_VALUE_MAX:
            raise InvalidArgumentError(
                f"metadata[{key!r}] is {len(value)} characters; the API allows "
                f"at most {METADATA_VALUE_MAX}"
            )
    return dict(metadata)


MAX_SPEC_AND_INPUT_CHARS = 25_000
"""The API's limit on a task spec and its input together, in characters of JSON."""


def coerce_input(value: object) -> str | Mapping[str, Any]:
    """A run's input as the API takes it: a non-empty string or a JSON object.

    An instance of a msgspec Struct or a dataclass (e.g. of your ``input_type``) becomes the
    JSON object it encodes to.
    """
    if isinstance(value, str):
        if not value:
            raise InvalidArgumentError("input must not be empty")
        return value
    if isinstance(value, Mapping):
        return value
    if isinstance(value, msgspec.Struct) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    ):
        built = msgspec.to_builtins(value)
        if isinstance(built, dict):
            return built
    raise InvalidArgumentError(
        "input must be a string, a JSON object (dict) or a Struct/dataclass instance, "
        f"got {type(value).__name__}"
    )


def spec_chars(spec: TaskSpec | None) -> int:
    """Characters of JSON the task spec takes (0 without one)."""
    return 0 if spec is None else len(msgspec.json.encode(spec).decode())


def check_spec_and_input(spec_size: int, input: str | Mapping[str, Any]) -> None:
    """Refuse a task spec and input over the API's 25,000 characters, before any request."""
    if not spec_size:
        return
    size = len(input) if isinstance(input, str) else len(msgspec.json.encode(input).decode())
    if spec_size + size > MAX_SPEC_AND_INPUT_CHARS:
        raise InvalidArgumentError(
            f"the task spec ({spec_size:,} characters) and the input ({size:,}) come to "
            f"{spec_size + size:,} characters; the API allows {MAX_SPEC_AND_INPUT_CHARS:,}: "
            "shorten the input or the schema descriptions"
        )


def build_run_input(
    *,
    input: object,
    processor: object,
    metadata: object = None,
    task_spec: object = None,
    source_policy: object = None,
    advanced_settings: object = None,
    previous_interaction_id: object = None,
    mcp_servers: object = None,
    enable_events: object = None,
    webhook: object = None,
    memory_scope_key: object = None,
    output: object = None,
    input_type: object = None,
) -> RunInput:
    """Check a create's arguments and build its body; raise `InvalidArgumentError`.

    ``output`` (a type, a text description or a schema) and ``input_type`` build the task spec
    from types; they cannot be combined with ``task_spec``.
    """
    if output is not None or input_type is not None:
        if task_spec is not None:
            raise InvalidArgumentError("pass either task_spec or output/input_type, not both")
        if output is None:
            raise InvalidArgumentError("input_type needs an output (type, description or schema)")
        task_spec = output_task_spec(output, input_schema=input_type)
    input = coerce_input(input)
    if not isinstance(processor, str) or not processor:
        raise InvalidArgumentError(
            f"processor must be a name like 'base' or 'core', got {processor!r}"
        )
    if previous_interaction_id is not None and not isinstance(previous_interaction_id, str):
        raise InvalidArgumentError("previous_interaction_id must be a string")
    if enable_events is not None and not isinstance(enable_events, bool):
        raise InvalidArgumentError("enable_events must be a boolean")
    if memory_scope_key is not None and (
        not isinstance(memory_scope_key, str) or not _ID_RE.fullmatch(memory_scope_key)
    ):
        raise InvalidArgumentError("memory_scope_key must be 1-128 letters, digits, '_' or '-'")
    spec = None if task_spec is None else convert_task_spec(task_spec)
    check_spec_and_input(spec_chars(spec), input)
    return RunInput(
        input=dict(input) if isinstance(input, Mapping) else input,
        processor=processor,
        metadata=check_metadata(metadata),
        task_spec=spec,
        source_policy=None
        if source_policy is None
        else _convert(source_policy, SourcePolicy, "source_policy"),
        advanced_settings=None
        if advanced_settings is None
        else _convert(advanced_settings, TaskAdvancedSettings, "advanced_settings"),
        previous_interaction_id=previous_interaction_id,
        mcp_servers=None
        if mcp_servers is None
        else _convert(mcp_servers, list[McpServer], "mcp_servers"),
        enable_events=enable_events,
        webhook=None if webhook is None else _convert(webhook, Webhook, "webhook"),
        memory_scope_key=memory_scope_key,
    )


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date).

    There is deliberately no upper cap: whether a long wait is acceptable is the caller's
    deadline's decision, not a constant's.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # "-0000" (what email.utils.formatdate() emits) parses naive; it means UTC, not local.
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_parts(body: bytes) -> tuple[str, str | None, Any]:
    """(message, ref_id, detail) from any of the error shapes the API is known to send."""
    try:
        data = _ANY_DECODER.decode(body)
    except Exception:  # any body (even one too deeply nested) is a message
        text = body.decode("utf-8", "replace").strip()
        return (text[:500] or "(empty body)", None, None)
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            ref_id = err.get("ref_id")
            detail = err.get("detail", err.get("details"))
            return (str(err.get("message") or "(no message)"), ref_id, detail)
        if "detail" in data:  # FastAPI validation shape
            return ("Request validation error", None, data["detail"])
        if isinstance(data.get("message"), str):
            return (data["message"], None, None)
    return (body.decode("utf-8", "replace")[:500], None, None)


def error_from_response(status: int, headers: Mapping[str, str], body: bytes) -> APIStatusError:
    """The typed error for a non-2xx answer, carrying status, headers, body and ref_id."""
    message, ref_id, detail = _error_parts(body)
    kwargs: dict[str, Any] = {
        "status": status,
        "headers": headers,
        "body": body,
        "ref_id": ref_id if isinstance(ref_id, str) else None,
        "detail": detail,
    }
    if status == 429:
        return RateLimitError(message, retry_after=parse_retry_after(headers), **kwargs)
    if status >= 500:
        return InternalServerError(message, **kwargs)
    return _STATUS_ERRORS.get(status, APIStatusError)(message, **kwargs)


def decode_run_input(status: int, body: bytes) -> RunInput:
    """Decode a stored run input, accepting schema objects that leave out their ``type``."""
    try:
        return RUN_INPUT_DECODER.decode(body)
    except msgspec.ValidationError:
        pass  # fall back to the lenient path below
    except Exception as exc:  # see `decode`
        raise _decode_error(exc, status, body) from None
    try:
        data = _ANY_DECODER.decode(body)
        spec = data.get("task_spec") if isinstance(data, dict) else None
        if isinstance(spec, dict):
            for key in ("output_schema", "input_schema"):
                if spec.get(key) is not None:
                    spec[key] = _normalize_schema(spec[key])
        return msgspec.convert(data, RunInput)
    except Exception as exc:  # see `decode`
        raise _decode_error(exc, status, body) from None


def decode(decoder: msgspec.json.Decoder[T], status: int, body: bytes) -> T:
    """Decode a 2xx body, or raise `DecodeError` carrying the raw body."""
    try:
        return decoder.decode(body)
    except Exception as exc:  # whatever a body does to the decoder is its fault
        raise _decode_error(exc, status, body) from None


def _decode_error(exc: Exception, status: int, body: bytes) -> DecodeError:
    """The `DecodeError` of a body that failed to decode, whatever the decoder raised.

    Not only msgspec's own errors: a body nested deeper than the decoder's recursion limit
    (``[[[[...]]]]``, 2 KB) raises `RecursionError`, and one answer must never escape as an
    untyped error that tears down a whole fan-out.
    """
    if isinstance(exc, msgspec.DecodeError):  # ValidationError too: its message says it all
        return DecodeError(f"malformed response: {exc}", status=status, body=body)
    return DecodeError(f"malformed response: {type(exc).__name__}: {exc}", status=status, body=body)


def encode(value: Any) -> bytes:
    """Encode a request body."""
    return ENCODER.encode(value)

"""Typed events of the run and group SSE streams, and the task group wire Structs.

Every event JSON carries a ``type``. Decoding reads that ``type`` first (a cheap pass that skips
everything else), then decodes the whole event with the one decoder built, at import, for that
type. So:

* known types decode into their Struct (``task_run.state``, ``task_run.progress_stats``,
  ``error``, and ``task_group_status`` on group streams);
* **every** ``task_run.progress_msg.*`` -- the five the spec lists and any newer one (the docs
  already show ``.tool``) -- decodes into `TaskRunProgressMessageEvent`, whose ``type``
  keeps the concrete string;
* any other ``type`` decodes into `UnknownEvent` instead of failing, so a newer server
  never breaks a stream;
* data that is not JSON, not an object, has no string ``type``, does not fit the schema of its
  (known) type, or makes the decoder fail in any other way (a ``RecursionError`` on data nested
  too deeply) raises `parallel_async._errors.DecodeError` (status 200, the raw data).

Each event exposes ``.type``. As everywhere in the package, unknown fields are ignored.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import msgspec

from ._errors import DecodeError
from ._models import (
    ErrorObject,
    Metadata,
    RunInput,
    TaskRun,
    TaskRunJsonOutput,
    TaskRunTextOutput,
    _Base,
)

__all__ = [
    "PROGRESS_MSG_PREFIX",
    "PROGRESS_MSG_TYPES",
    "ErrorEvent",
    "GroupEvent",
    "RunEvent",
    "SourceStats",
    "TaskGroup",
    "TaskGroupRunResponse",
    "TaskGroupStatus",
    "TaskGroupStatusEvent",
    "TaskRunProgressMessageEvent",
    "TaskRunProgressStatsEvent",
    "TaskRunStateEvent",
    "UnknownEvent",
    "decode_group_event",
    "decode_run_event",
]

PROGRESS_MSG_PREFIX = "task_run.progress_msg."
PROGRESS_MSG_TYPES: frozenset[str] = frozenset(
    PROGRESS_MSG_PREFIX + kind for kind in ("plan", "search", "result", "tool_call", "exec_status")
)
"""The progress message types the spec lists; others (e.g. ``.tool``) decode just the same."""


# --- task groups --------------------------------------------------------------------------------


class TaskGroupStatus(_Base):
    """The aggregate status of a task group."""

    num_task_runs: int
    task_run_status_counts: dict[str, int]
    """Runs per status; the API may leave out statuses with no run."""
    is_active: bool
    """True while at least one run is queued, running or cancelling."""
    status_message: str | None = None
    modified_at: str | None = None


class TaskGroup(_Base):
    """A task group (``POST /v1/tasks/groups``, ``GET /v1/tasks/groups/{id}``)."""

    taskgroup_id: str
    """The group's id (``tgrp_...``)."""
    status: TaskGroupStatus
    """Aggregate status: run counts per status, ``is_active``."""
    created_at: str | None = None
    """RFC 3339 creation time."""
    metadata: Metadata | None = None
    """The metadata given at creation."""


class TaskGroupRunResponse(_Base):
    """The answer to adding runs to a group (``POST /v1/tasks/groups/{id}/runs``).

    ``run_ids`` are in input order; the cursors (``None`` or empty for the group's first batch)
    resume ``/runs`` and ``/events`` streams just before these runs.
    """

    status: TaskGroupStatus
    """The group's status after the add."""
    run_ids: list[str]
    """The new runs, in input order."""
    run_cursor: str | None = None
    """``last_event_id`` for ``get_runs`` just before these runs."""
    event_cursor: str | None = None
    """``last_event_id`` for ``events`` just before these runs."""


# --- events -------------------------------------------------------------------------------------


class TaskRunStateEvent(_Base, tag_field="type", tag="task_run.state"):
    """A run's status (``task_run.state``): first and last event of a run stream; on group
    streams, a run that reached a non-active status (``event_id`` is then a resume cursor)."""

    run: TaskRun
    """The run's status object."""
    event_id: str | None = None
    """Resume cursor on group streams (``None`` on run streams)."""
    input: RunInput | None = None
    """The run's input, when asked for (``get_runs(include_input=True)``)."""
    output: TaskRunJsonOutput | TaskRunTextOutput | None = None
    """The output of a completed run, on a run stream's last event or with ``include_output``."""

    @property
    def type(self) -> str:
        """Always ``"task_run.state"``."""
        return "task_run.state"


class SourceStats(_Base):
    """How many sources a run considered and read so far, with a sample of URLs read."""

    num_sources_considered: int | None = None
    """Sources considered so far."""
    num_sources_read: int | None = None
    """Sources read so far."""
    sources_read_sample: list[str] | None = None
    """A sample of the URLs read."""


class TaskRunProgressStatsEvent(_Base, tag_field="type", tag="task_run.progress_stats"):
    """Aggregate progress of a run (``task_run.progress_stats``)."""

    source_stats: SourceStats
    """Sources considered and read."""
    progress_meter: float
    """Completion percentage, 0 to 100."""

    @property
    def type(self) -> str:
        """Always ``"task_run.progress_stats"``."""
        return "task_run.progress_stats"


class TaskRunProgressMessageEvent(_Base):
    """A progress message (``task_run.progress_msg.<kind>``), of a known kind or not.

    ``type`` is the concrete type string (e.g. ``"task_run.progress_msg.plan"``); `kind` is
    its last part (``"plan"``).
    """

    type: str
    """The full type, e.g. ``"task_run.progress_msg.plan"``."""
    message: str
    """The message text."""
    timestamp: str | None = None
    """RFC 3339 time the message was produced."""

    @property
    def kind(self) -> str:
        """The kind of message: ``"plan"``, ``"search"``, ``"result"``, ..."""
        return self.type[len(PROGRESS_MSG_PREFIX) :]


class ErrorEvent(_Base, tag_field="type", tag="error"):
    """An error reported on the stream (``error``)."""

    error: ErrorObject
    """What went wrong: message, ref_id, detail."""

    @property
    def type(self) -> str:
        """Always ``"error"``."""
        return "error"


class TaskGroupStatusEvent(_Base, tag_field="type", tag="task_group_status"):
    """A group's aggregate status (``task_group_status``); ``event_id`` is a resume cursor."""

    event_id: str
    """Resume cursor."""
    status: TaskGroupStatus
    """The group's aggregate status."""

    @property
    def type(self) -> str:
        """Always ``"task_group_status"``."""
        return "task_group_status"


class UnknownEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event whose ``type`` this version does not know: its type and whole JSON object."""

    type: str
    """The event's ``type``."""
    data: dict[str, Any]
    """The whole JSON object of the event."""


RunEvent: TypeAlias = (
    TaskRunStateEvent
    | TaskRunProgressStatsEvent
    | TaskRunProgressMessageEvent
    | ErrorEvent
    | UnknownEvent
)
"""An event of ``GET /v1/tasks/runs/{id}/events``."""

GroupEvent: TypeAlias = TaskGroupStatusEvent | TaskRunStateEvent | ErrorEvent | UnknownEvent
"""An event of ``GET /v1/tasks/groups/{id}/events`` (and of ``.../runs``: state and error)."""


# --- decoding -----------------------------------------------------------------------------------


class _Envelope(msgspec.Struct):
    type: str


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_ANY_OBJECT = msgspec.json.Decoder(dict[str, Any])
_PROGRESS_MSG = msgspec.json.Decoder(TaskRunProgressMessageEvent)
_STATE = msgspec.json.Decoder(TaskRunStateEvent)
_ERROR = msgspec.json.Decoder(ErrorEvent)

_RUN_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "task_run.state": _STATE,
    "task_run.progress_stats": msgspec.json.Decoder(TaskRunProgressStatsEvent),
    "error": _ERROR,
}
_GROUP_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "task_group_status": msgspec.json.Decoder(TaskGroupStatusEvent),
    "task_run.state": _STATE,
    "error": _ERROR,
}


def _decode(
    data: str | bytes, decoders: dict[str, msgspec.json.Decoder[Any]], progress: bool, what: str
) -> Any:
    try:
        kind = _ENVELOPE.decode(data).type
        decoder = decoders.get(kind)
        if decoder is not None:
            return decoder.decode(data)
        if progress and kind.startswith(PROGRESS_MSG_PREFIX):
            return _PROGRESS_MSG.decode(data)
        return UnknownEvent(type=kind, data=_ANY_OBJECT.decode(data))
    except Exception as exc:  # e.g. RecursionError on a deeply nested event
        body = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
        reason = (
            str(exc) if isinstance(exc, msgspec.DecodeError) else f"{type(exc).__name__}: {exc}"
        )
        raise DecodeError(f"invalid {what} event: {reason}", status=200, body=body) from exc


def decode_run_event(data: str | bytes) -> RunEvent:
    """Decode the ``data`` of one run stream event (``/v1/tasks/runs/{id}/events``).

    Raises:
        DecodeError: the data is not a JSON object with a string ``type``, or does not fit the
            schema of its known type.
    """
    result: RunEvent = _decode(data, _RUN_DECODERS, True, "run")
    return result


def decode_group_event(data: str | bytes) -> GroupEvent:
    """Decode the ``data`` of one group stream event (``/v1/tasks/groups/{id}/events`` or
    ``.../runs``); progress messages, which groups never send, come back as
    `UnknownEvent`.

    Raises:
        DecodeError: as `decode_run_event`.
    """
    result: GroupEvent = _decode(data, _GROUP_DECODERS, False, "group")
    return result

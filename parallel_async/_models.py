"""Wire types of the Task API, as msgspec Structs.

They follow the official OpenAPI document: required fields come first, every optional field has
a default, unknown fields are ignored (``forbid_unknown_fields`` stays off) so that a newer server
never breaks an older client. Decoders are built once, at import (see ``_protocol``).

Attribute parity with the official SDK: a tagged Struct's tag (``type``) is not a field in
msgspec, so each one has a read-only ``type`` property returning the same value as its tag
(which msgspec alone encodes); ``TaskRun.task_group_id`` reads the wire field ``taskgroup_id``.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias, get_args

import msgspec

__all__ = [
    "ACTIVE_STATUSES",
    "TERMINAL_STATUSES",
    "AutoSchema",
    "Citation",
    "ErrorObject",
    "ErrorResponse",
    "FieldBasis",
    "JsonSchema",
    "McpServer",
    "McpToolCall",
    "Metadata",
    "OutputSchema",
    "RunInput",
    "RunStatus",
    "SourcePolicy",
    "TaskAdvancedSettings",
    "TaskRun",
    "TaskRunJsonOutput",
    "TaskRunOutput",
    "TaskRunResult",
    "TaskRunTextOutput",
    "TaskSpec",
    "TextSchema",
    "Warning",
    "Webhook",
]

RunStatus: TypeAlias = Literal[
    "queued", "action_required", "running", "completed", "failed", "cancelling", "cancelled"
]
"""The seven run statuses of the API. ``TaskRun.status`` is typed ``str`` so that a status added
by a newer server decodes instead of failing; compare it against these values."""

RUN_STATUSES: frozenset[str] = frozenset(get_args(RunStatus))
"""`RunStatus` as a set."""

ACTIVE_STATUSES: frozenset[str] = frozenset({"queued", "running", "cancelling"})
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

Metadata: TypeAlias = dict[str, str | int | float | bool]


class _Base(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Shared options: keyword construction, and defaults left out of encoded requests."""


# --- errors -------------------------------------------------------------------------------------


class ErrorObject(_Base, omit_defaults=False):
    """The ``error`` object of an error response or of a failed run."""

    message: str = ""
    ref_id: str | None = None
    detail: dict[str, Any] | None = None


class ErrorResponse(_Base, omit_defaults=False):
    """The body of a non-2xx answer: ``{"type": "error", "error": {...}}``."""

    error: ErrorObject
    type: str = "error"


class Warning(_Base):
    """A non-fatal problem the API noticed, e.g. an input that does not fit its schema."""

    type: str
    message: str
    detail: dict[str, Any] | None = None


# --- task run status ----------------------------------------------------------------------------


class TaskRun(_Base, omit_defaults=False):
    """The status object of a task run (``GET /v1/tasks/runs/{run_id}``).

    ``interaction_id`` is optional here although the spec requires it: servers older than
    March 2026 do not send it, and a status we can read is worth more than strictness.
    """

    run_id: str
    status: str
    is_active: bool
    processor: str
    interaction_id: str | None = None
    created_at: str | None = None
    modified_at: str | None = None
    metadata: Metadata | None = None
    taskgroup_id: str | None = None
    warnings: list[Warning] | None = None
    error: ErrorObject | None = None

    @property
    def is_terminal(self) -> bool:
        """True once the run is completed, failed or cancelled."""
        return self.status in TERMINAL_STATUSES

    @property
    def task_group_id(self) -> str | None:
        """The official SDK's name for ``taskgroup_id`` (the wire field); read-only."""
        return self.taskgroup_id


# --- task spec and request ----------------------------------------------------------------------


class JsonSchema(_Base, tag_field="type", tag="json"):
    """A JSON output (or input) schema: ``json_schema`` is a JSON Schema object."""

    json_schema: dict[str, Any]

    @property
    def type(self) -> Literal["json"]:
        """Always ``"json"`` (the tag on the wire)."""
        return "json"


class TextSchema(_Base, tag_field="type", tag="text"):
    """A free-text output (or input), optionally described."""

    description: str | None = None

    @property
    def type(self) -> Literal["text"]:
        """Always ``"text"`` (the tag on the wire)."""
        return "text"


class AutoSchema(_Base, tag_field="type", tag="auto"):
    """Let the processor choose the output schema."""

    @property
    def type(self) -> Literal["auto"]:
        """Always ``"auto"`` (the tag on the wire)."""
        return "auto"


OutputSchema: TypeAlias = JsonSchema | TextSchema | AutoSchema | str
"""An output schema; a bare string is the shorthand for a text schema with that description."""


class TaskSpec(_Base):
    """What a run should produce (``output_schema``) and, optionally, what it reads."""

    output_schema: OutputSchema
    input_schema: JsonSchema | TextSchema | str | None = None


class SourcePolicy(_Base):
    """Which web sources a run may use."""

    include_domains: list[str] = msgspec.field(default_factory=list)
    exclude_domains: list[str] = msgspec.field(default_factory=list)
    after_date: str | None = None


class TaskAdvancedSettings(_Base):
    """Advanced run settings (``location`` is an ISO 3166-1 alpha-2 code)."""

    location: str | None = None


class Webhook(_Base, omit_defaults=False):
    """Where the API POSTs a run's final status."""

    url: str
    event_types: list[str] = msgspec.field(default_factory=lambda: ["task_run.status"])


class McpServer(_Base):
    """An MCP server a run may call tools on (beta ``mcp-server-2025-07-17``)."""

    name: str
    url: str
    type: str = "url"
    headers: dict[str, str] | None = None
    allowed_tools: list[str] | None = None

    def __repr__(self) -> str:
        # headers usually carry credentials for the MCP server: never print them
        shown = None if self.headers is None else dict.fromkeys(self.headers, "***")
        return f"McpServer(name={self.name!r}, url={self.url!r}, headers={shown!r})"


class RunInput(_Base):
    """A run's request: the body of ``POST /v1/tasks/runs`` and of ``GET .../input``."""

    input: str | dict[str, Any]
    processor: str
    metadata: Metadata | None = None
    task_spec: TaskSpec | None = None
    source_policy: SourcePolicy | None = None
    advanced_settings: TaskAdvancedSettings | None = None
    previous_interaction_id: str | None = None
    mcp_servers: list[McpServer] | None = None
    enable_events: bool | None = None
    webhook: Webhook | None = None
    memory_scope_key: str | None = None


# --- results ------------------------------------------------------------------------------------


class Citation(_Base):
    """A source behind a field of the output."""

    url: str
    title: str | None = None
    excerpts: list[str] | None = None


class FieldBasis(_Base, omit_defaults=False):
    """Why the run produced a field: reasoning, citations and a confidence level."""

    field: str
    reasoning: str = ""
    citations: list[Citation] = msgspec.field(default_factory=list)
    confidence: str | None = None


class McpToolCall(_Base):
    """One MCP tool call a run made."""

    tool_call_id: str
    server_name: str
    tool_name: str
    arguments: str
    content: str | None = None
    error: str | None = None


class TaskRunJsonOutput(_Base, tag_field="type", tag="json", omit_defaults=False):
    """A structured output: ``content`` is a JSON object fitting the run's output schema."""

    content: dict[str, Any]
    basis: list[FieldBasis] = msgspec.field(default_factory=list)
    output_schema: dict[str, Any] | None = None
    mcp_tool_calls: list[McpToolCall] | None = None
    beta_fields: dict[str, Any] | None = None

    @property
    def type(self) -> Literal["json"]:
        """Always ``"json"`` (the tag on the wire)."""
        return "json"

    def basis_for(self, field: str) -> FieldBasis | None:
        """The basis entry of a top-level field (or ``field.N`` list element), if any."""
        return next((b for b in self.basis if b.field == field), None)


class TaskRunTextOutput(_Base, tag_field="type", tag="text", omit_defaults=False):
    """A free-text output, usually a markdown report."""

    content: str
    basis: list[FieldBasis] = msgspec.field(default_factory=list)
    mcp_tool_calls: list[McpToolCall] | None = None
    beta_fields: dict[str, Any] | None = None

    @property
    def type(self) -> Literal["text"]:
        """Always ``"text"`` (the tag on the wire)."""
        return "text"

    def basis_for(self, field: str = "output") -> FieldBasis | None:
        """The basis entry of the text output (its field is ``"output"``)."""
        return next((b for b in self.basis if b.field == field), None)


TaskRunOutput: TypeAlias = TaskRunJsonOutput | TaskRunTextOutput


class TaskRunResult(_Base):
    """A completed run and its output (``GET /v1/tasks/runs/{run_id}/result``)."""

    run: TaskRun
    output: TaskRunOutput

"""Run store and lifecycle: ``queued -> running -> completed | failed | cancelled``.

Each run costs one record, at most two loop timer handles and, only while someone
long-polls it, one future per waiting request; nothing polls. That keeps 10,000+
runs in one process cheap, and long-polls wake the moment a run finishes.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from . import _outputs
from ._wire import encode, new_ref_id, rfc3339

__all__ = [
    "ACTIVE_STATUSES",
    "TERMINAL_STATUSES",
    "USE_DEFAULT",
    "Outcome",
    "PlanFunction",
    "RunPlan",
    "RunRecord",
    "RunStore",
]

Outcome = Literal["completed", "failed", "cancelled"]
ACTIVE_STATUSES = frozenset({"queued", "running", "cancelling"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
_OUTCOMES = frozenset(("completed", "failed", "cancelled"))
DEFAULT_ERROR_MESSAGE = "Task run failed: the processor could not produce an output"


class _UseDefault(enum.Enum):
    """Type of ``USE_DEFAULT``, the ``RunPlan.duration`` that defers to the fake."""

    USE_DEFAULT = "use default"

    def __repr__(self) -> str:
        return "<use default>"


USE_DEFAULT = _UseDefault.USE_DEFAULT
"""``RunPlan.duration`` default: the fake's own duration for the run's processor."""


@dataclass(frozen=True)
class RunPlan:
    """How one run behaves, chosen per run by the ``plan`` callback of ``FakeParallel``.

    Attributes:
        duration: Seconds from creation to the final status. Left out: the fake's
            default (``processor_durations``, else ``duration``, or forever in manual
            mode). ``None`` or ``math.inf``: the run stays active until
            ``complete``/``fail``/``cancel``, whatever the fake's mode.
        outcome: Final status reached when the duration elapses.
        error_message: ``error.message`` of the run when ``outcome`` is ``"failed"``.
        content: Output content instead of the generated one: a ``str`` gives a text
            output, a mapping a JSON output.
    """

    duration: float | _UseDefault | None = USE_DEFAULT
    outcome: Outcome = "completed"
    error_message: str = DEFAULT_ERROR_MESSAGE
    content: object | None = None

    def __post_init__(self) -> None:
        if self.outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(_OUTCOMES)}, not {self.outcome!r}")
        duration = self.duration
        if isinstance(duration, (int, float)) and (math.isnan(duration) or duration < 0):
            raise ValueError(f"duration must be >= 0, None or left out, not {duration!r}")
        _check_content(self.content)


PlanFunction = Callable[[dict[str, Any]], "RunPlan | None"]


def _check_content(content: object) -> None:
    if content is not None and not isinstance(content, (str, Mapping)):
        raise TypeError(
            "content must be a str (text output) or a mapping (JSON output), "
            f"not {type(content).__name__}"
        )


class RunRecord:
    """One task run as the fake stores it.

    Attributes:
        run_id: ``trun_`` + 32 hex characters (also the ``interaction_id``).
        processor: Processor name from the create body.
        input: The decoded create body (``TaskRunInput``), as received.
        status: Current status (``queued``, ``running``, ``action_required``,
            ``completed``, ``failed``, ``cancelling`` or ``cancelled``).
        created_at: Wall-clock creation time (``time.time()``).
        modified_at: Wall-clock time of the last status change.
        completed_at: Wall-clock time the run reached a terminal status, else ``None``.
        error: ``{ref_id, message, detail}`` when the run failed, else ``None``.
        taskgroup_id: Group of the run, ``None`` for standalone runs.
        planned_duration: Seconds from creation to the final status as scheduled at
            creation (``math.inf`` when the run waits for ``complete``/``fail``/...).
        on_status: Called as ``on_status(record, old_status)`` after every status change
            (task groups hook in here); ``None`` for standalone runs.
    """

    __slots__ = (
        "_content",
        "_created_text",
        "_output",
        "_result_body",
        "_run_body",
        "_timer",
        "_waiters",
        "completed_at",
        "created_at",
        "error",
        "input",
        "modified_at",
        "on_status",
        "plan",
        "planned_duration",
        "processor",
        "run_id",
        "status",
        "taskgroup_id",
    )

    def __init__(
        self, run_id: str, body: dict[str, Any], plan: RunPlan, taskgroup_id: str | None
    ) -> None:
        now = time.time()
        self.run_id = run_id
        self.processor: str = body["processor"]
        self.input = body
        self.plan = plan
        self.taskgroup_id = taskgroup_id
        self.status = "queued"
        self.created_at = now
        self.modified_at = now
        self._created_text = rfc3339(now)
        self.completed_at: float | None = None
        self.error: dict[str, Any] | None = None
        self._content: object | None = plan.content
        self._output: dict[str, Any] | None = None
        self._run_body: bytes | None = None
        self._result_body: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiters: set[asyncio.Future[None]] | None = None
        self.planned_duration = math.inf
        self.on_status: Callable[[RunRecord, str], None] | None = None

    @property
    def is_active(self) -> bool:
        """Whether the spec counts the run as active (queued, running or cancelling)."""
        return self.status in ACTIVE_STATUSES

    @property
    def is_terminal(self) -> bool:
        """Whether the run reached completed, failed or cancelled."""
        return self.status in TERMINAL_STATUSES

    @property
    def metadata(self) -> Any:
        """The ``metadata`` object of the create body, or ``None``."""
        return self.input.get("metadata")

    @property
    def output(self) -> dict[str, Any] | None:
        """The ``output`` object of the result, once the run completed."""
        if self.status != "completed":
            return None
        if self._output is None:
            self._output = _outputs.build_output(self.input, self.run_id, self._content)
        return self._output

    def to_wire(self) -> dict[str, Any]:
        """The run as a ``TaskRun`` JSON object."""
        return {
            "run_id": self.run_id,
            "interaction_id": self.run_id,
            "status": self.status,
            "is_active": self.is_active,
            "processor": self.processor,
            "metadata": self.metadata,
            "taskgroup_id": self.taskgroup_id,
            "warnings": None,
            "error": self.error,
            "created_at": self._created_text,
            "modified_at": rfc3339(self.modified_at),
        }

    def run_body(self) -> bytes:
        """Encoded ``TaskRun``, cached until the next status change."""
        if self._run_body is None:
            self._run_body = encode(self.to_wire())
        return self._run_body

    def result_body(self) -> bytes:
        """Encoded ``TaskRunResult`` of a completed run (cached: it never changes)."""
        if self._result_body is None:
            output = encode(self.output)
            self._result_body = b'{"run":' + self.run_body() + b',"output":' + output + b"}"
        return self._result_body

    def _set_status(self, status: str) -> None:
        old, self.status = self.status, status
        self.modified_at = time.time()
        self._run_body = None
        if status in TERMINAL_STATUSES:
            self.completed_at = self.modified_at
        if self.on_status is not None:
            self.on_status(self, old)


class RunStore:
    """All runs of one fake, their timers and their long-poll waiters."""

    def __init__(
        self,
        *,
        duration: float,
        processor_durations: Mapping[str, float] | None,
        manual: bool,
        plan: PlanFunction | None,
    ) -> None:
        self.duration = duration
        self.processor_durations = dict(processor_durations or {})
        self.manual = manual
        self.plan = plan
        self.runs: dict[str, RunRecord] = {}
        # called once per run reaching a final status (the webhook sender hooks in here)
        self.on_finish: Callable[[RunRecord], None] | None = None

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[RunRecord]:
        return iter(self.runs.values())

    def get(self, run_id: str) -> RunRecord | None:
        """Return the run with ``run_id``, or ``None``."""
        return self.runs.get(run_id)

    def _duration_for(self, processor: str, plan: RunPlan) -> float:
        if plan.duration is None:
            return math.inf
        if not isinstance(plan.duration, _UseDefault):
            return plan.duration
        if self.manual:
            return math.inf
        return self.processor_durations.get(processor, self.duration)

    def create(self, body: dict[str, Any], *, taskgroup_id: str | None = None) -> RunRecord:
        """Store a run for a validated create body and schedule its lifecycle."""
        plan = (self.plan(body) if self.plan is not None else None) or RunPlan()
        record = RunRecord(f"trun_{uuid.uuid4().hex}", body, plan, taskgroup_id)
        self.runs[record.run_id] = record
        loop = asyncio.get_running_loop()
        loop.call_soon(self._start, record)
        duration = self._duration_for(record.processor, plan)
        record.planned_duration = duration
        if math.isfinite(duration):
            record._timer = loop.call_later(max(duration, 0.0), self._finish, record)
        return record

    def _start(self, record: RunRecord) -> None:
        if record.status == "queued":
            record._set_status("running")

    def _finish(self, record: RunRecord) -> None:
        record._timer = None
        if record.is_terminal:
            return
        plan = record.plan
        if plan.outcome == "failed":
            self._terminate(record, "failed", error_message=plan.error_message)
        else:
            self._terminate(record, plan.outcome)

    def _terminate(
        self,
        record: RunRecord,
        status: Outcome,
        *,
        error_message: str | None = None,
        content: object | None = None,
    ) -> None:
        if record._timer is not None:
            record._timer.cancel()
            record._timer = None
        if content is not None:
            record._content = content
        if error_message is not None:
            record.error = {"ref_id": new_ref_id(), "message": error_message, "detail": None}
        record._set_status(status)
        record.completed_at = record.modified_at
        waiters, record._waiters = record._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        if self.on_finish is not None:
            self.on_finish(record)

    def _require(self, run_id: str) -> RunRecord:
        record = self.runs.get(run_id)
        if record is None:
            raise KeyError(f"unknown run id {run_id!r}")
        if record.is_terminal:
            raise ValueError(f"run {run_id} is already {record.status}")
        return record

    def complete(self, run_id: str, content: object | None = None) -> None:
        """Complete an active run now, optionally with explicit output ``content``."""
        _check_content(content)
        self._terminate(self._require(run_id), "completed", content=content)

    def fail(self, run_id: str, message: str = DEFAULT_ERROR_MESSAGE) -> None:
        """Fail an active run now with ``error.message`` = ``message``."""
        self._terminate(self._require(run_id), "failed", error_message=message)

    def cancel(self, run_id: str) -> None:
        """Cancel an active run now."""
        self._terminate(self._require(run_id), "cancelled")

    def require_action(self, run_id: str) -> None:
        """Move an active run to ``action_required`` (not active, not terminal)."""
        self._require(run_id)._set_status("action_required")

    async def wait(self, record: RunRecord, timeout: float) -> None:
        """Wait until ``record`` is terminal or ``timeout`` seconds pass."""
        if record.is_terminal or timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if record._waiters is None:
            record._waiters = set()
        record._waiters.add(waiter)
        # A timer resolving the future is cheaper than wait_for's task and timeout scope.
        timer = loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if record._waiters is not None:
                record._waiters.discard(waiter)

    def close(self) -> None:
        """Cancel every pending lifecycle timer (runs then stay as they are)."""
        for record in self.runs.values():
            if record._timer is not None:
                record._timer.cancel()
                record._timer = None


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

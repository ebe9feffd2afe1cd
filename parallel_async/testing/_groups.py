"""Task groups: membership, incremental status counts and the per-group event log.

A group keeps its run ids in insertion order (the ``/runs`` stream and its cursors
follow it) and an append-only event log for ``/events``: a terminal run is logged as
its ``RunRecord`` (encoded when sent, it no longer changes), a status event as its
pre-encoded ``TaskGroupStatus`` bytes. Event ``n`` (1-based) has cursor ``str(n)``.

Status counts are updated from ``RunRecord.on_status`` in O(1). A status event is
logged after each ``add_runs`` and after runs leave the active set (terminal or
``action_required``), coalesced to at most one per loop iteration. Each group has a
single future that wakes every stream waiting on it, so 10,000 runs cost
O(runs + events) in total.

Slow adds: ``GroupStore.add_delay`` and ``hold_adds``/``release_adds`` make an accepted
``add_runs`` request take time before its runs exist. That work runs in its own task, so a
client hanging up (a read timeout, a dropped connection) does not stop it, as on a real
server: the runs appear later, which is what reconciling a lost answer must cope with.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from ._state import ACTIVE_STATUSES, TERMINAL_STATUSES, RunRecord
from ._wire import encode, rfc3339

__all__ = ["GroupRecord", "GroupStore", "LogEntry"]

T = TypeVar("T")

LogEntry = RunRecord | bytes
"""One group event: a terminal run (``task_run.state``) or encoded ``TaskGroupStatus``."""


class GroupRecord:
    """One task group as the fake stores it.

    Attributes:
        taskgroup_id: ``tgrp_`` + 32 hex characters.
        metadata: The ``metadata`` of the create body, or ``None``.
        created_at: Wall-clock creation time.
        modified_at: Wall-clock time of the last change to the group's status.
        run_ids: Ids of the group's runs, in the order they were added.
        counts: Runs per status (zero entries removed).
        log: The group event log (see the module documentation).
    """

    __slots__ = (
        "_changed",
        "_status_pending",
        "counts",
        "created_at",
        "log",
        "metadata",
        "modified_at",
        "run_ids",
        "taskgroup_id",
    )

    def __init__(self, taskgroup_id: str, metadata: Mapping[str, Any] | None) -> None:
        now = time.time()
        self.taskgroup_id = taskgroup_id
        self.metadata = None if metadata is None else dict(metadata)
        self.created_at = now
        self.modified_at = now
        self.run_ids: list[str] = []
        self.counts: Counter[str] = Counter()
        self.log: list[LogEntry] = []
        self._changed: asyncio.Future[None] | None = None
        self._status_pending = False

    @property
    def num_runs(self) -> int:
        """Number of runs in the group."""
        return len(self.run_ids)

    @property
    def is_active(self) -> bool:
        """Whether any run of the group is queued, running or cancelling."""
        counts = self.counts
        return any(counts[status] for status in ACTIVE_STATUSES)

    @property
    def settled(self) -> bool:
        """Inactive, with the final status event already logged: streams may end."""
        return not self._status_pending and not self.is_active

    def status(self) -> dict[str, Any]:
        """The group's ``TaskGroupStatus``."""
        finished = sum(self.counts[status] for status in TERMINAL_STATUSES)
        total = len(self.run_ids)
        return {
            "num_task_runs": total,
            "task_run_status_counts": {k: v for k, v in self.counts.items() if v},
            "is_active": self.is_active,
            "status_message": f"{finished} of {total} task runs finished",
            "modified_at": rfc3339(self.modified_at),
        }

    def to_wire(self) -> dict[str, Any]:
        """The group as a ``TaskGroupResponse``."""
        return {
            "taskgroup_id": self.taskgroup_id,
            "status": self.status(),
            "created_at": rfc3339(self.created_at),
            "metadata": self.metadata,
        }

    def add(self, record: RunRecord) -> None:
        """Add a freshly created (``queued``) run and follow its status changes."""
        self.run_ids.append(record.run_id)
        self.counts[record.status] += 1
        self.modified_at = time.time()
        record.on_status = self._on_run_status

    def log_status(self) -> None:
        """Append a ``task_group_status`` event for the current status."""
        self._status_pending = False
        self.log.append(encode(self.status()))
        self._notify()

    def _on_run_status(self, record: RunRecord, old: str) -> None:
        counts = self.counts
        counts[old] -= 1
        if not counts[old]:
            del counts[old]
        counts[record.status] += 1
        self.modified_at = record.modified_at
        if record.status in TERMINAL_STATUSES:
            self.log.append(record)
            self._notify()
        elif record.status in ACTIVE_STATUSES:
            return  # e.g. queued -> running: counted, but no event
        if not self._status_pending:
            self._status_pending = True
            asyncio.get_running_loop().call_soon(self._emit_status)

    def _emit_status(self) -> None:
        if self._status_pending:
            self.log_status()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Wait until the log or the status changes, or ``timeout`` seconds pass."""
        if timeout <= 0:
            return
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        # asyncio.wait never cancels the shared future, whoever gives up waiting.
        await asyncio.wait((self._changed,), timeout=timeout)


class GroupStore:
    """All task groups of one fake (``fake.groups`` is its read-only view).

    Attributes:
        groups: Task group id -> ``GroupRecord``.
        add_delay: Seconds an accepted ``add_runs`` request takes before its runs exist
            (default 0: created at once). The wait goes on if the client hangs up.
    """

    def __init__(self) -> None:
        self.groups: dict[str, GroupRecord] = {}
        self.add_delay = 0.0
        self._gate: asyncio.Event | None = None
        self._hold_left: int | None = None  # adds the current hold still takes (None: all)
        self._adds: set[asyncio.Future[Any]] = set()

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[GroupRecord]:
        return iter(self.groups.values())

    def get(self, taskgroup_id: str) -> GroupRecord | None:
        """Return the group with ``taskgroup_id``, or ``None``."""
        return self.groups.get(taskgroup_id)

    def create(self, metadata: Mapping[str, Any] | None) -> GroupRecord:
        """Store a new, empty group."""
        group = GroupRecord(f"tgrp_{uuid.uuid4().hex}", metadata)
        self.groups[group.taskgroup_id] = group
        return group

    @property
    def slow_adds(self) -> bool:
        """Whether an ``add_runs`` accepted now would wait before creating its runs."""
        return self.add_delay > 0 or (self._gate is not None and self._hold_left != 0)

    @property
    def adds_pending(self) -> int:
        """``add_runs`` requests accepted whose runs do not exist yet (delayed or held)."""
        return len(self._adds)

    def hold_adds(self, count: int | None = None) -> None:
        """Hold the next ``count`` accepted ``add_runs`` (``None``: all) until `release_adds`.

        A held add waits, after ``add_delay``, before creating its runs, so tests decide
        exactly when they appear. Release held adds before the test ends (or call `close`).
        """
        if count is not None and count < 0:
            raise ValueError(f"count must be >= 0 or None, not {count!r}")
        if self._gate is None:
            self._gate = asyncio.Event()
        self._hold_left = count

    def release_adds(self) -> None:
        """Let the held adds create their runs; adds accepted from now on are not held."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    def start_add(self, create: Callable[[], T]) -> asyncio.Future[T]:
        """Call ``create`` after ``add_delay`` and any hold, in a task no hang-up cancels."""
        gate, delay = self._gate, self.add_delay
        if gate is not None and self._hold_left is not None:
            if self._hold_left:
                self._hold_left -= 1
            else:
                gate = None

        async def later() -> T:
            if delay > 0:
                await asyncio.sleep(delay)
            if gate is not None:
                await gate.wait()
            return create()

        task = asyncio.ensure_future(later())
        self._adds.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._adds.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failure after the client hung up is not logged

    def close(self) -> None:
        """Cancel the adds still delayed or held (their runs are never created)."""
        self._gate = None
        for task in list(self._adds):
            task.cancel()

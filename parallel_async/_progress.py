"""Progress of a fan-out, as immutable snapshots handed to an observer callback."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

__all__ = ["Progress", "ProgressCallback", "ProgressTracker"]


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a fan-out's counts, for a progress bar, a log line or a dashboard.

    Attributes:
        total: runs expected (``None`` while a lazy input iterable is still being read).
        created: runs created so far (``map`` only; for existing runs, the runs tracked).
        in_flight: requests open right now.
        completed: runs that ended with a result.
        failed: runs that ended with an error other than a timeout.
        timed_out: runs whose deadline passed before they finished.
        elapsed: seconds since the fan-out started.
        queued: runs that exist and that the API last reported ``queued``.
        running: runs that exist and have not ended, other than those known to be queued
            (the group strategy learns each run's status from the group's events; the poll
            strategy only from the create's answer, so there runs show as queued until done).
    """

    total: int | None
    created: int
    in_flight: int
    completed: int
    failed: int
    timed_out: int
    elapsed: float
    queued: int = 0
    running: int = 0

    @property
    def done(self) -> int:
        """Runs with an outcome."""
        return self.completed + self.failed + self.timed_out

    @property
    def rate(self) -> float:
        """Outcomes per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Estimated seconds left at the current rate (``None`` when unknown)."""
        if self.total is None or self.rate <= 0:
            return None
        return max(0, self.total - self.done) / self.rate


ProgressCallback = Callable[[Progress], object]


class ProgressTracker:
    """Mutable counters behind `Progress`; calls the observer on every change."""

    __slots__ = (
        "callback",
        "completed",
        "created",
        "failed",
        "in_flight",
        "on_error",
        "started",
        "states",
        "timed_out",
        "total",
    )

    def __init__(
        self,
        callback: ProgressCallback | None,
        total: int | None,
        *,
        on_error: Callable[[Exception], object] | None = None,
        states: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.callback = callback
        self.states = states  # (queued, running), read from the run ledger
        self.on_error = on_error
        self.total = total
        self.created = self.in_flight = self.completed = self.failed = self.timed_out = 0
        self.started = time.monotonic()

    def snapshot(self) -> Progress:
        """The current counts."""
        queued, running = (0, 0) if self.states is None else self.states()
        return Progress(
            total=self.total,
            created=self.created,
            in_flight=self.in_flight,
            completed=self.completed,
            failed=self.failed,
            timed_out=self.timed_out,
            elapsed=time.monotonic() - self.started,
            queued=queued,
            running=running,
        )

    def notify(self) -> None:
        """Hand a snapshot to the observer, if there is one.

        An observer that raises is not called again; its exception goes to ``on_error`` (the
        fan-out then ends and raises it as itself) instead of tearing through the engine.
        """
        if self.callback is not None:
            try:
                self.callback(self.snapshot())
            except Exception as exc:
                self.callback = None
                if self.on_error is None:
                    raise
                self.on_error(exc)

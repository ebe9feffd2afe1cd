"""How ``enrich`` shows its progress: a live bar (rich, on a terminal), a plain line every few
seconds (logs, CI), or JSON lines (pipelines and agents). All count rows by state."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol, TextIO

from .._enrich_output import EnrichProgress

__all__ = ["JsonView", "PlainView", "View", "choose_view"]

PLAIN_EVERY = 5.0  # seconds between plain progress lines
JSON_EVERY = 2.0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_fields(p: EnrichProgress) -> dict[str, Any]:
    """A snapshot as a flat dict (the JSON lines' fields)."""
    return {
        "total": p.total,
        "read": p.read,
        "queued": p.queued,
        "running": p.running,
        "completed": p.completed,
        "failed": p.failed,
        "reused": p.reused,
        "created": p.created,
        "elapsed": round(p.elapsed, 3),
        "rate": round(p.rate, 3),
        "eta": None if p.eta is None else round(p.eta, 1),
    }


class View(Protocol):
    """A progress display."""

    def update(self, p: EnrichProgress) -> None: ...

    def note(self, event: str, message: str, **fields: Any) -> None: ...

    def close(self) -> None: ...


class PlainView:
    """One line every `PLAIN_EVERY` seconds, and the last one, on ``stream``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last = 0.0
        self._final: EnrichProgress | None = None

    def update(self, p: EnrichProgress) -> None:
        self._final = p
        now = time.monotonic()
        if now - self._last >= PLAIN_EVERY:
            self._last = now
            self._line(p)

    def _line(self, p: EnrichProgress) -> None:
        total = "?" if p.total is None else str(p.total)
        self._stream.write(
            f"rows {p.done}/{total}: queued {p.queued}, running {p.running}, completed "
            f"{p.completed}, failed {p.failed}, from the journal {p.reused}; "
            f"{p.rate:.1f} rows/s, eta {_duration(p.eta)}\n"
        )
        self._stream.flush()

    def note(self, event: str, message: str, **fields: Any) -> None:
        self._stream.write(message + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._final is not None:
            self._line(self._final)


class JsonView:
    """JSON lines: ``{"event": "progress", ...}`` every `JSON_EVERY` seconds, notes, and the
    caller's final ``summary``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last = 0.0
        self._final: EnrichProgress | None = None

    def emit(self, record: dict[str, Any]) -> None:
        """Write one JSON line."""
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()

    def update(self, p: EnrichProgress) -> None:
        self._final = p
        now = time.monotonic()
        if now - self._last >= JSON_EVERY:
            self._last = now
            self.emit({"event": "progress", **progress_fields(p)})

    def note(self, event: str, message: str, **fields: Any) -> None:
        self.emit({"event": event, "message": message, **fields})

    def close(self) -> None:
        if self._final is not None:
            self.emit({"event": "progress", **progress_fields(self._final)})


class RichView:
    """A live bar on a terminal: rows done of total, queued, running, failed, rate, ETA."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._console = Console(file=stream)
        self._progress = Progress(
            TextColumn("[bold]enrich"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}"),
            console=self._console,
            transient=False,
        )
        self._task = self._progress.add_task("enrich", total=None, detail="", eta="?")
        self._progress.start()

    def update(self, p: EnrichProgress) -> None:
        detail = (
            f"queued {p.queued} · running {p.running} · [green]ok {p.completed}[/] · "
            f"[red]failed {p.failed}[/] · {p.rate:.1f}/s"
        )
        self._progress.update(
            self._task, completed=p.done, total=p.total, detail=detail, eta=_duration(p.eta)
        )

    def note(self, event: str, message: str, **fields: Any) -> None:
        self._progress.console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        self._progress.stop()


def choose_view(json_lines: bool, stream: TextIO | None = None) -> View:
    """JSON lines if asked, a rich bar on a terminal (with rich installed), else plain lines."""
    stream = stream if stream is not None else sys.stderr
    if json_lines:
        return JsonView(stream)
    if stream.isatty():
        try:
            return RichView(stream)
        except ImportError:
            pass
    return PlainView(stream)

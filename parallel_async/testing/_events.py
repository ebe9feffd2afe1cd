"""Run event stream ``GET /v1/tasks/runs/{run_id}/events`` (endpoint name ``run_events``).

Each run has a deterministic progress trace derived from its creation time, planned
duration and final status, so nothing is stored per run and every connection replays
the same messages with the same timestamps:

* ``plan`` at creation, then ``search``, ``search`` and ``result`` at 25 %, 50 % and
  75 % of the planned duration (a run that ends early, or has no planned end, gets the
  ones not yet due stamped with its end time);
* an ``exec_status`` message at the final status.

A connection sends a ``task_run.state`` event for the current status, the messages so
far, the latest ``task_run.progress_stats``, then live messages and stats as they come
due, and ends with a ``task_run.state`` event carrying ``output`` (when completed).
After the fake's ``run_stream_lifetime`` the server closes the stream mid-run.
"""

from __future__ import annotations

import asyncio
import math
import time
import zlib
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ._app import check_auth, endpoint
from ._group_routes import run_state_event
from ._sse import EventStream
from ._state import RunRecord
from ._wire import RUN_NOT_FOUND, encode, error_response, rfc3339

if TYPE_CHECKING:
    from ._fake import FakeParallel

__all__ = ["Message", "RunEventRoutes", "progress_messages", "progress_stats"]

Message = tuple[float, str, str]
"""``(timestamp, kind, text)``; the event type is ``task_run.progress_msg.<kind>``."""

_SCHEDULE: tuple[tuple[float, str, str], ...] = (
    (0.0, "plan", "Planning how to research: {topic}"),
    (0.25, "search", "Searching the web for: {topic}"),
    (0.5, "search", "Reading the most relevant sources"),
    (0.75, "result", "Drafting the answer from {sources} sources"),
)
_FINAL = {
    "completed": "Task run completed",
    "failed": "Task run failed",
    "cancelled": "Task run cancelled",
}
# Waking a hair after a message is due absorbs the wall-clock/loop-clock difference.
_SLACK = 0.002


def _topic(record: RunRecord) -> str:
    value = record.input.get("input")
    text = value if isinstance(value, str) else ", ".join(map(str, value or {}))
    return text if len(text) <= 80 else text[:77] + "..."


def _sources(record: RunRecord) -> int:
    return 4 + zlib.crc32(record.run_id.encode()) % 12


def _due(record: RunRecord, fraction: float) -> float | None:
    """When scheduled message ``fraction`` is (or was) due, ``None`` if not known yet."""
    end = record.completed_at
    if fraction == 0.0:
        return record.created_at
    duration = record.planned_duration
    planned = record.created_at + fraction * duration if math.isfinite(duration) else math.inf
    if end is not None:
        return min(planned, end)
    return planned if math.isfinite(planned) else None


def progress_messages(record: RunRecord, now: float) -> tuple[list[Message], float | None]:
    """The messages due by ``now`` (in order) and when the next one is due, if known."""
    topic, sources = _topic(record), _sources(record)
    messages: list[Message] = []
    for fraction, kind, text in _SCHEDULE:
        due = _due(record, fraction)
        if due is None:
            return messages, None
        if due > now:
            return messages, due
        messages.append((due, kind, text.format(topic=topic, sources=sources)))
    if record.completed_at is not None and record.status in _FINAL:
        messages.append((record.completed_at, "exec_status", _FINAL[record.status]))
    return messages, None


def progress_stats(record: RunRecord, messages: list[Message]) -> dict[str, Any]:
    """The ``task_run.progress_stats`` event matching ``messages``."""
    steps = min(len(messages), len(_SCHEDULE)) - 1
    meter = 100.0 if record.status == "completed" else 25.0 * max(steps, 0)
    considered = 0 if steps <= 0 else _sources(record) * steps
    read = considered // 2
    short = record.run_id[-8:]
    sample = [f"https://example.com/{short}/source-{index}" for index in range(min(read, 3))]
    return {
        "type": "task_run.progress_stats",
        "source_stats": {
            "num_sources_considered": considered,
            "num_sources_read": read,
            "sources_read_sample": sample,
        },
        "progress_meter": meter,
    }


async def _send_message(stream: EventStream, message: Message) -> bool:
    timestamp, kind, text = message
    event_type = f"task_run.progress_msg.{kind}"
    data = {"type": event_type, "message": text, "timestamp": rfc3339(timestamp)}
    return await stream.send(event_type, encode(data))


class RunEventRoutes:
    """Handler of ``/v1/tasks/runs/{run_id}/events`` (and its ``/v1beta`` twin)."""

    def __init__(self, fake: FakeParallel) -> None:
        self.fake = fake

    def register(self, app: web.Application) -> None:
        """Add the run-events routes to ``app``."""
        handler = endpoint(self.fake, "run_events", self.events)
        for prefix in ("/v1", "/v1beta"):
            app.router.add_get(f"{prefix}/tasks/runs/{{run_id}}/events", handler, allow_head=False)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Stream a run's state, progress messages and stats, ending at its final status."""
        fake = self.fake
        denied = check_auth(fake, request)
        if denied is not None:
            return denied
        run_id = request.match_info["run_id"]
        record = fake.store.get(run_id)
        if record is None:
            return error_response(404, RUN_NOT_FOUND, {"run_id": run_id})
        clock = asyncio.get_running_loop().time
        lifetime = fake.run_stream_lifetime
        deadline = clock() + lifetime if math.isfinite(lifetime) else math.inf
        async with EventStream(fake, request) as stream:
            if not await stream.send("task_run.state", run_state_event(record, None)):
                return stream.response
            sent, last_stats = 0, b""
            while True:
                terminal = record.is_terminal
                messages, next_due = progress_messages(record, time.time())
                for message in messages[sent:]:
                    if not await _send_message(stream, message):
                        return stream.response
                sent = len(messages)
                stats = encode(progress_stats(record, messages))
                if stats != last_stats:
                    last_stats = stats
                    if not await stream.send("task_run.progress_stats", stats):
                        return stream.response
                if terminal:
                    final = run_state_event(record, None, None, record.output)
                    await stream.send("task_run.state", final)
                    break
                await stream.flush()
                remaining = deadline - clock()
                if remaining <= 0 or stream.closed:
                    break
                wait = remaining
                if next_due is not None:
                    wait = min(wait, max(next_due - time.time(), 0.0) + _SLACK)
                await fake.store.wait(record, min(wait, 86400.0))
        return stream.response

"""Run streams replay every event on reconnect: tell the replayed events from the new ones."""

from __future__ import annotations

from collections import Counter

import msgspec

from ._events import (
    ErrorEvent,
    RunEvent,
    TaskRunProgressMessageEvent,
    TaskRunProgressStatsEvent,
    TaskRunStateEvent,
    UnknownEvent,
)

__all__ = ["Replays"]


def _event_key(event: RunEvent) -> object:
    """What identifies a replayed event as one we already yielded."""
    if isinstance(event, TaskRunProgressMessageEvent):
        return (event.type, event.timestamp, event.message)
    if isinstance(event, TaskRunStateEvent):
        return ("state", event.run.status, event.output is not None)
    if isinstance(event, TaskRunProgressStatsEvent):
        return ("stats", event.progress_meter, msgspec.json.encode(event.source_stats))
    if isinstance(event, ErrorEvent):
        return ("error", event.error.message, event.error.ref_id)
    if isinstance(event, UnknownEvent):
        return ("unknown", event.type, msgspec.json.encode(event.data))
    return None


class Replays:
    """Tells the events a reconnection replays from the new ones.

    Counts, per key, the events yielded so far; a new connection's first ``k`` copies of a key
    are replays when ``k`` were yielded already. So identical events on one connection (two
    equal progress messages without a timestamp) all get through, and a full replay after a
    reconnect yields nothing twice.
    """

    __slots__ = ("_connection", "_yielded")

    def __init__(self) -> None:
        self._yielded: Counter[object] = Counter()
        self._connection: Counter[object] = Counter()

    def new_connection(self) -> None:
        """A new connection starts: it replays from the start."""
        self._connection = Counter()

    def is_replay(self, event: RunEvent) -> bool:
        """Record ``event`` (of the current connection); True if it was already yielded."""
        key = _event_key(event)
        if key is None:
            return False
        self._connection[key] += 1
        if self._connection[key] <= self._yielded[key]:
            return True
        self._yielded[key] += 1
        return False

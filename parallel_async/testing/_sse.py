"""Server-sent events: framing, buffered writes, stream stats and the ``cut_stream`` fault.

Every event is framed as ``event: <type>\\ndata: <compact json>\\n\\n``. Events are
buffered and flushed in batches (and before every wait), so replaying a 10,000-event
log costs a handful of socket writes. A ``cut_stream`` fault drawn for the request
makes ``send`` write half of the event after the allowed count and close the
connection without ending the chunked body, which clients see as a broken stream.
"""

from __future__ import annotations

import math
import re
from types import TracebackType
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ._faults import CURRENT_FAULT
from ._wire import encode, validation_response

if TYPE_CHECKING:
    from ._fake import FakeParallel

__all__ = ["EventStream", "frame", "parse_bool", "parse_cursor", "parse_seconds"]

_FLUSH_AT = 64 * 1024
_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_CURSOR = re.compile(r"\d{1,18}")
_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})


def frame(event_type: str, data: bytes) -> bytes:
    """One SSE event: an ``event:`` line, one ``data:`` line and a blank line."""
    return b"event: " + event_type.encode() + b"\ndata: " + data + b"\n\n"


def _query_error(name: str, msg: str, kind: str, value: str) -> web.Response:
    error: dict[str, Any] = {"loc": ["query", name], "msg": msg, "type": kind, "input": value}
    return validation_response([error])


def parse_cursor(request: web.Request, limit: int) -> int | web.Response:
    """``last_event_id`` as a log position (0 = from the start), or a 422 response.

    Cursors are the decimal event positions the fake hands out; anything else, or a
    position past ``limit`` (events that do not exist yet), is rejected.
    """
    raw = request.query.get("last_event_id")
    if raw is None or raw == "":
        return 0
    if not _CURSOR.fullmatch(raw) or int(raw) > limit:
        return _query_error("last_event_id", "Unknown event cursor", "value_error", raw)
    return int(raw)


def parse_bool(request: web.Request, name: str, default: bool) -> bool | web.Response:
    """Boolean query parameter ``name`` (FastAPI spellings), or a 422 response."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    return _query_error(name, "Input should be a valid boolean", "bool_parsing", raw)


def parse_seconds(request: web.Request, name: str) -> float | web.Response | None:
    """Optional non-negative number of seconds ``name``, or a 422 response."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        return _query_error(name, "Input should be a valid number", "float_parsing", raw)
    return max(value, 0.0)


class EventStream:
    """One SSE response: ``async with EventStream(fake, request) as stream: ...``.

    Entering sends the headers; ``send`` queues events, ``flush`` writes them; leaving
    flushes what is left (aiohttp then ends the body when the handler returns
    ``stream.response``). ``closed`` turns true when the stream was cut or the
    client went away; ``send`` then returns ``False`` and the handler should stop.
    """

    def __init__(self, fake: FakeParallel, request: web.Request) -> None:
        self.fake = fake
        self.request = request
        self.response = web.StreamResponse(status=200, headers=_HEADERS)
        fault = CURRENT_FAULT.get()
        self._cut_after = (
            fault.after_events if fault is not None and fault.kind == "cut_stream" else None
        )
        self._buffer = bytearray()
        self.sent = 0
        self.closed = False

    async def __aenter__(self) -> EventStream:
        await self.response.prepare(self.request)
        self.fake.stats.stream_opened()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                await self.flush()
        finally:
            self.fake.stats.stream_closed()

    async def send(self, event_type: str, data: bytes) -> bool:
        """Queue one event; ``False`` once the stream is closed (cut or client gone)."""
        if self.closed:
            return False
        payload = frame(event_type, data)
        if self._cut_after is not None and self.sent >= self._cut_after:
            self._buffer += payload[: len(payload) // 2]
            await self.flush()
            self._cut()
            return False
        self._buffer += payload
        self.sent += 1
        self.fake.stats.events_sent += 1
        if len(self._buffer) >= _FLUSH_AT:
            await self.flush()
        return not self.closed

    async def send_json(self, event_type: str, data: object) -> bool:
        """``send`` with ``data`` encoded as compact JSON."""
        return await self.send(event_type, encode(data))

    async def flush(self) -> None:
        """Write the queued events to the socket."""
        if not self._buffer or self.closed:
            return
        chunk, self._buffer = bytes(self._buffer), bytearray()
        try:
            await self.response.write(chunk)
        except ConnectionError:
            self.closed = True

    def _cut(self) -> None:
        self.closed = True
        self.fake.stats.streams_cut += 1
        transport = self.request.transport
        if transport is not None:
            # close() still sends what is buffered (the half event), then hangs up.
            transport.close()

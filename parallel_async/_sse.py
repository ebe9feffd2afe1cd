"""An incremental Server-Sent Events decoder. Pure: no I/O, no clock, no asyncio.

It follows the WHATWG "event stream interpretation" algorithm
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):

* lines end with ``\\r\\n``, ``\\n`` or ``\\r``; one stream may mix them;
* one UTF-8 byte order mark at the very start of the stream is dropped; invalid UTF-8 is replaced
  with U+FFFD, as the spec asks;
* a line starting with ``:`` is a comment (a keep-alive): it is ignored, but counted in
  `SSEDecoder.comments` so that a caller can notice the connection is alive;
* ``field: value`` lines: a single space after the colon is stripped; a line without a colon is a
  field with an empty value; unknown fields are ignored;
* ``event`` sets the event name (``"message"`` when absent or empty);
* ``data`` lines accumulate and are joined with ``\\n``;
* ``id`` sets the last event id, unless its value contains NUL; the last event id persists across
  events (every later event carries it until another ``id`` line changes it) and across
  `SSEDecoder.close` (it is what a reconnection would resume from);
* ``retry`` is honoured only when its value is ASCII digits (milliseconds);
* a blank line dispatches the event; a block that had no ``data`` line at all is not dispatched
  (a ``data`` line with an empty value does count: it dispatches an event whose data is ``""``).

End of stream (`SSEDecoder.close`): the spec discards an event that is not followed by a
blank line. We deviate in one case, on purpose: when **every line of the stream was terminated**
(the stream ended right after a line ending), a pending event with at least one ``data`` line is
dispatched, so a server that forgets the final blank line loses nothing. When the stream ends in
the **middle of a line** (bytes after the last line ending), the connection was cut: that partial
line is dropped *and so is the whole pending event* -- a cut stream never yields a half event, nor
an event whose name or id might have been cut -- and `SSEDecoder.truncated` is set. It is set too
when the stream ends after field lines of an event that has no ``data`` line yet (say its
``event:`` line only): that event was cut as well. Either way a caller should treat the end as a
broken connection (and resume), not as the server ending the stream.

Size limit: a line longer than ``max_line`` bytes (or an event whose ``data`` lines add up to
more) raises `parallel_async._errors.EventTooLargeError` as soon as it gets that long, instead of
being buffered whole: a server that never ends a line must not exhaust memory.

Splitting is done on bytes (``\\r`` and ``\\n`` never occur inside a multi-byte UTF-8 sequence, so
a chunk may end anywhere, even inside a character or between ``\\r`` and ``\\n``); the Python loop
runs once per line, never once per character; chunks without a line ending are only buffered, so a
huge line fed in small pieces costs linear time.
"""

from __future__ import annotations

import msgspec

from ._defaults import MAX_SSE_LINE
from ._errors import EventTooLargeError

__all__ = ["DEFAULT_MAX_LINE", "SSEDecoder", "ServerSentEvent"]

DEFAULT_MAX_LINE = MAX_SSE_LINE  # far above any event the API sends, far below harm

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D
_COLON = 0x3A


class ServerSentEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One dispatched event.

    Attributes:
        data: the ``data`` lines, joined with ``\\n``.
        event: the event name; ``"message"`` when the server sent none.
        id: the last event id seen on the stream so far (it persists across events), or ``None``
            if the stream never sent a valid ``id`` line.
        retry: the reconnection time in milliseconds, if this event's block had a valid ``retry``
            line (the latest one, including from blocks that dispatched nothing, is in
            `SSEDecoder.retry`).
    """

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder: `feed` it byte chunks as they arrive, then `close` at EOF.

    Attributes:
        last_event_id: the last event id buffer (``None`` until a valid ``id`` line arrives).
        retry: the latest valid ``retry`` value, in milliseconds (``None`` if none yet).
        comments: how many comment lines were seen (keep-alives); compare before and after a
            `feed` to detect activity that dispatched no event.
        truncated: set by `close` when the stream ended in the middle of an event: in the middle
            of a line, or after field lines (``event``, ``id``, ...) of an event that never got a
            ``data`` line. Comment lines alone do not count.

    ``max_line``: the most bytes a line, or an event's ``data`` lines together, may take;
    ``path`` (the stream's URL path) only goes into the `EventTooLargeError`.

    After `close` the decoder may be fed a new stream (a reconnection): ``last_event_id``,
    ``retry`` and ``comments`` persist, everything else restarts (including byte order mark
    handling).
    """

    __slots__ = (
        "_at_start",
        "_block",
        "_data",
        "_data_size",
        "_event",
        "_max",
        "_path",
        "_pending",
        "_pending_size",
        "_retry_field",
        "_skip_lf",
        "comments",
        "last_event_id",
        "retry",
        "truncated",
    )

    def __init__(self, max_line: int = DEFAULT_MAX_LINE, *, path: str = "") -> None:
        self._max = max_line
        self._path = path
        self._pending: list[bytes] = []  # bytes of the current, unterminated line
        self._pending_size = 0
        self._data_size = 0
        self._skip_lf = False  # the last chunk ended with \r: drop a \n starting the next one
        self._at_start = True  # no line completed yet: the first one may start with a BOM
        self._data: list[bytes] = []
        self._block = False  # a field line arrived since the last blank line
        self._event = b""
        self._retry_field: int | None = None
        self.last_event_id: str | None = None
        self.retry: int | None = None
        self.comments = 0
        self.truncated = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[ServerSentEvent]:
        """Consume a chunk of the stream; return the events it completed (often none)."""
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\n" not in chunk and b"\r" not in chunk:
            self._buffer(chunk)
            return []
        if self._pending:
            self._pending.append(chunk)
            chunk = b"".join(self._pending)
            self._pending = []
            self._pending_size = 0
        if b"\r" in chunk:
            # a \r at the very end ends its line now; the \n that may follow is dropped later
            self._skip_lf = chunk[-1] == _CR
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        tail = lines.pop()
        self._check_lengths(len(chunk), lines)
        if tail:
            self._buffer(tail)
        if self._at_start:
            self._at_start = False
            if lines[0].startswith(_BOM):
                lines[0] = lines[0][len(_BOM) :]
        return self._lines(lines)

    def close(self) -> list[ServerSentEvent]:
        """Signal the end of the stream; return the final event, if the rules above allow it."""
        cut_line = bool(self._pending)
        self.truncated = cut_line or (self._block and not self._data)
        events: list[ServerSentEvent] = []
        if self._data and not cut_line:
            events.append(self._dispatch())
        self._pending = []
        self._pending_size = 0
        self._skip_lf = False
        self._at_start = True
        self._reset_block()
        return events

    # --- internals ------------------------------------------------------------------------------

    def _buffer(self, part: bytes) -> None:
        """Keep ``part`` of the unterminated line, unless the line gets too long."""
        self._pending.append(part)
        self._pending_size += len(part)
        if self._pending_size > self._max:
            raise self._too_large(b"".join(self._pending), "a line")

    def _check_lengths(self, size: int, lines: list[bytes]) -> None:
        """Refuse a line over the limit among ``lines`` (``size`` bytes in all)."""
        if size > self._max:  # only then can one of them be too long
            for line in lines:
                if len(line) > self._max:
                    raise self._too_large(line, "a line")

    def _lines(self, lines: list[bytes]) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(self._dispatch())
                else:
                    self._reset_block()
                continue
            if line[0] == _COLON:
                self.comments += 1
                continue
            self._block = True
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
                self._data_size += len(value) + 1
                if self._data_size > self._max:
                    raise self._too_large(b"\n".join(self._data), "an event's data")
            elif name == b"event":
                self._event = value
            elif name == b"id":
                if b"\x00" not in value:
                    self.last_event_id = value.decode("utf-8", "replace")
            elif name == b"retry" and value.isdigit():  # bytes.isdigit: ASCII digits only
                self._retry_field = self.retry = int(value)
        return events

    def _dispatch(self) -> ServerSentEvent:
        event = ServerSentEvent(
            data=b"\n".join(self._data).decode("utf-8", "replace"),
            event=self._event.decode("utf-8", "replace") if self._event else "message",
            id=self.last_event_id,
            retry=self._retry_field,
        )
        self._reset_block()
        return event

    def _too_large(self, start: bytes, what: str) -> EventTooLargeError:
        where = f" of GET {self._path}" if self._path else ""
        return EventTooLargeError(
            f"{what} of the event stream{where} passed {self._max:,} bytes without ending",
            limit=self._max,
            body=start,
            path=self._path,
        )

    def _reset_block(self) -> None:
        self._block = False
        self._data = []
        self._data_size = 0
        self._event = b""
        self._retry_field = None

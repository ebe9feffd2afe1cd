"""The SSE decoder (``_sse``) and the typed stream events (``_events``)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel_async._errors import DecodeError
from parallel_async._events import (
    PROGRESS_MSG_TYPES,
    ErrorEvent,
    SourceStats,
    TaskGroup,
    TaskGroupRunResponse,
    TaskGroupStatus,
    TaskGroupStatusEvent,
    TaskRunProgressMessageEvent,
    TaskRunProgressStatsEvent,
    TaskRunStateEvent,
    UnknownEvent,
    decode_group_event,
    decode_run_event,
)
from parallel_async._models import TaskRunJsonOutput, TaskRunTextOutput
from parallel_async._sse import ServerSentEvent, SSEDecoder

SPEC = Path(__file__).resolve().parents[1].parent / "shared" / "spec" / "parallel-openapi.json"


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.close()


def ev(data: str, event: str = "message", id: str | None = None, retry: int | None = None) -> Any:
    return ServerSentEvent(data=data, event=event, id=id, retry=retry)


# --- SSE decoder: edge cases --------------------------------------------------------------------


def test_documented_sample() -> None:
    stream = (
        b"event: task_run.state\n"
        b'data: {"type":"task_run.state"}\n'
        b"\n"
        b"event: task_run.progress_stats\n"
        b'data: {"type":"task_run.progress_stats"}\n'
        b"\n"
    )
    assert decode(stream) == [
        ev('{"type":"task_run.state"}', "task_run.state"),
        ev('{"type":"task_run.progress_stats"}', "task_run.progress_stats"),
    ]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    stream = eol.join([b"event: a", b"data: 1", b"data: 2", b"", b"data: 3", b"", b""])
    assert decode(stream) == [ev("1\n2", "a"), ev("3")]
    # split between every byte (including between \r and \n)
    assert decode(*(stream[i : i + 1] for i in range(len(stream)))) == [ev("1\n2", "a"), ev("3")]


def test_mixed_line_endings() -> None:
    assert decode(b"data: a\r\ndata: b\rdata: c\n\r\n\rdata: d\r\r") == [ev("a\nb\nc"), ev("d")]


def test_cr_at_chunk_end_dispatches_without_waiting() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r\r") == [ev("x")]  # no need to see the next byte
    assert decoder.feed(b"\ndata: y\r\n\r\n") == [ev("y")]  # that \n closed the \r line
    assert decoder.close() == []


def test_comments_are_ignored_and_counted() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b": keep-alive\n\n:\n") == []
    assert decoder.comments == 2
    assert decoder.feed(b"data: a\n: in the middle\ndata: b\n\n") == [ev("a\nb")]
    assert decoder.comments == 3
    assert decoder.close() == []


def test_multiline_data_and_empty_lines_in_data() -> None:
    assert decode(b"data: a\ndata:\ndata: b\ndata\n\n") == [ev("a\n\nb\n")]


def test_space_after_colon() -> None:
    assert decode(b"data:a\n\ndata: b\n\ndata:  c\n\ndata:\n\n") == [
        ev("a"),
        ev("b"),
        ev(" c"),
        ev(""),  # a data line with an empty value dispatches, per WHATWG
    ]


def test_colon_inside_value() -> None:
    assert decode(b'data: {"a": "b:c"}\n\n') == [ev('{"a": "b:c"}')]


def test_block_without_data_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: x\nid: 7\nretry: 10\n\n") == []
    assert decoder.last_event_id == "7"
    assert decoder.retry == 10
    # the event name does not leak into the next block; the id does
    assert decoder.feed(b"data: d\n\n") == [ev("d", id="7")]


def test_event_name() -> None:
    assert decode(b"event: task_run.state\ndata: x\n\nevent:\ndata: y\n\ndata: z\n\n") == [
        ev("x", "task_run.state"),
        ev("y"),
        ev("z"),
    ]
    assert decode(b"event: a\nevent: b\ndata: x\n\n") == [ev("x", "b")]


def test_id_persists_and_nul_is_ignored() -> None:
    stream = (
        b"id: 1\ndata: a\n\n"
        b"data: b\n\n"  # keeps id 1
        b"id: 2\x003\ndata: c\n\n"  # NUL: ignored, still 1
        b"id\ndata: d\n\n"  # empty id resets to ""
        b"id: 4\ndata: e\n\n"
    )
    assert [(e.data, e.id) for e in decode(stream)] == [
        ("a", "1"),
        ("b", "1"),
        ("c", "1"),
        ("d", ""),
        ("e", "4"),
    ]


def test_no_id_is_none() -> None:
    assert decode(b"data: a\n\n")[0].id is None


def test_retry() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(
        b"retry: 3000\ndata: a\n\n"
        b"data: b\n\n"
        b"retry: 1.5\ndata: c\n\n"
        b"retry: -1\ndata: d\n\n"
        b"retry:\ndata: e\n\n"
        b"retry: 12a\ndata: f\n\n"
        b"retry:  5\ndata: g\n\n"  # after the single stripped space, " 5" is not all digits
        b"retry:\xd9\xa3\ndata: h\n\n"  # a non-ASCII digit does not count
        b"retry: 0\ndata: i\n\n"
    )
    assert [(e.data, e.retry) for e in events] == [
        ("a", 3000),
        ("b", None),
        ("c", None),
        ("d", None),
        ("e", None),
        ("f", None),
        ("g", None),
        ("h", None),
        ("i", 0),
    ]
    assert decoder.retry == 0


def test_unknown_fields_and_field_without_colon() -> None:
    assert decode(b"foo: bar\nDATA: no\ndata : no\nbar\ndata: yes\nevent\n\n") == [ev("yes")]


def test_bom_at_start_only() -> None:
    bom = b"\xef\xbb\xbf"
    assert decode(bom + b"data: a\n\n") == [ev("a")]
    # a BOM split across chunks
    assert decode(bom[:1], bom[1:2], bom[2:] + b"data: a\n\n") == [ev("a")]
    # only one BOM is dropped: a second one makes the field name unknown
    assert decode(bom + bom + b"data: a\n\n") == []
    # not at the start: kept as part of the value
    assert decode(b"data: a\n\ndata: " + bom + b"b\n\n") == [ev("a"), ev("\ufeffb")]
    # a BOM before a blank first line
    assert decode(bom + b"\ndata: a\n\n") == [ev("a")]


def test_utf8_split_inside_character_and_invalid_bytes() -> None:
    text = "data: été ☃ 𝄞\n\n".encode()
    for cut in range(len(text)):
        assert decode(text[:cut], text[cut:]) == [ev("été ☃ 𝄞")]
    assert decode(b"data: \xff\n\n") == [ev("\ufffd")]


def test_missing_blank_line_at_end_still_yields_complete_event() -> None:
    assert decode(b"data: a\n\ndata: b\n") == [ev("a"), ev("b")]
    assert decode(b"data: a\r\ndata: b\r\n") == [ev("a\nb")]
    assert decode(b"data: b\r") == [ev("b")]
    assert decode(b"event: e\nid: 9\ndata: b\n") == [ev("b", "e", id="9")]
    decoder = SSEDecoder()
    assert decoder.feed(b"data: b\n") == []
    assert decoder.close() == [ev("b")]
    assert not decoder.truncated


def test_truncated_final_event_is_not_yielded() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a": 1}\n\ndata: {"b": ') == [ev('{"a": 1}')]
    assert decoder.close() == []
    assert decoder.truncated
    # a complete data line followed by a cut line (which might have been more data, an id...)
    assert decode(b"data: a\nda") == []
    assert decode(b"data: a\nid: 1") == []
    assert decode(b"data: a\n:keep") == []
    # nothing pending at all
    assert decode(b"") == []
    assert decode(b"event: x\n") == []


def test_cut_after_field_lines_of_an_event_is_truncated() -> None:
    # the stream ended on a line boundary, but inside an event that had no data line yet
    for tail in (b"event: task_run.state\n", b"id: 7\n", b"event: x\r\nid: 8\r\n", b"retry: 5\n"):
        decoder = SSEDecoder()
        assert decoder.feed(b"data: a\n\n" + tail) == [ev("a")]
        assert decoder.close() == []
        assert decoder.truncated, tail
    # a finished stream, and trailing comments, are not cuts
    for whole in (b"data: a\n\n", b"data: a\n\n: ping\n", b"id: 1\n\n", b"data: a\n", b""):
        decoder = SSEDecoder()
        decoder.feed(whole)
        decoder.close()
        assert not decoder.truncated, whole
    # truncated is per stream: a reconnection starts clean
    decoder = SSEDecoder()
    decoder.feed(b"event: x\n")
    decoder.close()
    assert decoder.truncated
    assert decoder.feed(b"data: b\n\n") == [ev("b")]
    assert decoder.close() == []
    assert not decoder.truncated


def test_close_resets_for_a_new_stream() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 5\ndata: a\n\nevent: x\ndata: cut")
    assert decoder.close() == []
    assert decoder.feed(b"\xef\xbb\xbfdata: b\n\n") == [ev("b", id="5")]
    assert decoder.close() == []
    assert not decoder.truncated


def test_feed_accepts_bytearray_and_empty_chunks() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(bytearray(b"data: a\n\n")) == [ev("a")]


def test_large_line_in_small_chunks() -> None:
    payload = b"x" * 200_000
    stream = b"data: " + payload + b"\n\n"
    chunks = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    assert decode(*chunks) == [ev(payload.decode())]


def test_server_sent_event_is_immutable() -> None:
    event = ev("a")
    with pytest.raises(AttributeError):
        event.data = "b"
    assert event == ServerSentEvent(data="a")
    assert hash(event) == hash(ServerSentEvent(data="a"))


# --- SSE decoder: property-based ----------------------------------------------------------------

_line_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
_id_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x00"), max_size=8)
_name_text = _line_text.filter(lambda s: s != "" and s[0] != " ")


class _Spec(NamedTuple):
    event: str | None
    data: list[str]
    id: str | None
    retry: int | None
    comment: str | None


_event = st.builds(
    _Spec,
    event=st.none() | _name_text,
    data=st.lists(_line_text, min_size=1, max_size=4),
    id=st.none() | _id_text,
    retry=st.none() | st.integers(0, 10**9),
    comment=st.none() | _line_text,
)
_eol = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def _streams(draw: st.DrawFn) -> tuple[bytes, list[ServerSentEvent]]:
    events = draw(st.lists(_event, max_size=6))
    lines: list[str] = []
    expected: list[ServerSentEvent] = []
    last_id: str | None = None
    for spec in events:
        others: list[str] = []
        if spec.comment is not None:
            others.append(":" + spec.comment)
        if spec.event is not None:
            others.append("event: " + spec.event)
        if spec.id is not None:
            others.append("id: " + spec.id)
            last_id = spec.id
        if spec.retry is not None:
            others.append(f"retry: {spec.retry}")
        # data lines keep their order; the other lines go anywhere among them
        block = ["data: " + d for d in spec.data]
        for line in others:
            block.insert(draw(st.integers(0, len(block))), line)
        lines += [*block, ""]
        expected.append(
            ServerSentEvent(
                data="\n".join(spec.data),
                event=spec.event or "message",
                id=last_id,
                retry=spec.retry,
            )
        )
    out: list[str] = ["\ufeff"] if draw(st.booleans()) else []
    previous = ""
    for line in lines:
        eol = draw(_eol)
        if previous == "\r" and line == "":
            eol = "\r"  # "\r" then "\n" would read as one "\r\n": keep the stream unambiguous
        out.append(line + eol)
        previous = eol
    return "".join(out).encode(), expected


def _split(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(_streams(), st.data())
def test_any_chunking_decodes_like_the_whole(
    generated: tuple[bytes, list[ServerSentEvent]], data: st.DataObject
) -> None:
    stream, expected = generated
    whole = decode(stream)
    assert whole == expected
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=len(stream) + 1))
    assert decode(*_split(stream, cuts)) == whole


@settings(max_examples=50, deadline=None)
@given(_streams())
def test_byte_by_byte_decodes_like_the_whole(
    generated: tuple[bytes, list[ServerSentEvent]],
) -> None:
    stream, expected = generated
    assert decode(*(stream[i : i + 1] for i in range(len(stream)))) == expected


@settings(max_examples=100, deadline=None)
@given(_streams(), st.data())
def test_cut_stream_never_yields_a_half_event(
    generated: tuple[bytes, list[ServerSentEvent]], data: st.DataObject
) -> None:
    stream, expected = generated
    cut = data.draw(st.integers(0, len(stream)))
    prefix = stream[:cut]
    got = decode(prefix)
    if not prefix.endswith((b"\n", b"\r")):
        # cut inside a line: only the events closed by a blank line, each whole
        assert got == expected[: len(got)]
        return
    # cut at a line boundary: the last event may lack its blank line, and so its last data lines
    if not got:
        return
    assert got[:-1] == expected[: len(got) - 1]
    if got:
        last, full = got[-1], expected[len(got) - 1]
        lines, full_lines = last.data.split("\n"), full.data.split("\n")
        assert full_lines[: len(lines)] == lines
        assert last.event in {full.event, "message"}  # its event line may not have come yet
        assert last.retry in {full.retry, None}


# --- typed events -------------------------------------------------------------------------------

RUN = {
    "run_id": "trun_1",
    "status": "completed",
    "is_active": False,
    "processor": "core",
    "created_at": "2025-04-23T20:21:48.037943Z",
    "modified_at": "2025-04-23T20:21:48.037943Z",
}
GROUP_STATUS = {
    "num_task_runs": 3,
    "task_run_status_counts": {"completed": 2, "running": 1},
    "is_active": True,
    "status_message": "",
    "modified_at": "2025-04-23T20:21:48.037943Z",
}


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def test_state_event_with_json_output() -> None:
    data = {
        "type": "task_run.state",
        "event_id": None,
        "input": {"input": "q", "processor": "core"},
        "run": RUN,
        "output": {"type": "json", "content": {"a": 1}, "basis": [{"field": "a"}]},
        "newer_field": [1, 2],
    }
    event = decode_run_event(_json(data))
    assert isinstance(event, TaskRunStateEvent)
    assert event.type == "task_run.state"
    assert event.event_id is None
    assert event.run.run_id == "trun_1"
    assert event.run.is_terminal
    assert event.input is not None
    assert event.input.input == "q"
    assert isinstance(event.output, TaskRunJsonOutput)
    assert event.output.content == {"a": 1}
    # bytes work too, and a minimal state event needs only `run`
    minimal = decode_run_event(_json({"type": "task_run.state", "run": RUN}).encode())
    assert isinstance(minimal, TaskRunStateEvent)
    assert minimal.input is None
    assert minimal.output is None
    # round trip through msgspec keeps the tag
    assert json.loads(msgspec.json.encode(minimal))["type"] == "task_run.state"


def test_state_event_with_text_output() -> None:
    data = {"type": "task_run.state", "run": RUN, "output": {"type": "text", "content": "# R"}}
    event = decode_run_event(_json(data))
    assert isinstance(event, TaskRunStateEvent)
    assert isinstance(event.output, TaskRunTextOutput)
    assert event.output.content == "# R"


def test_progress_stats_event() -> None:
    data = {
        "type": "task_run.progress_stats",
        "source_stats": {
            "num_sources_considered": 10,
            "num_sources_read": 4,
            "sources_read_sample": ["https://a.example"],
        },
        "progress_meter": 12.5,
    }
    event = decode_run_event(_json(data))
    assert event == TaskRunProgressStatsEvent(
        source_stats=SourceStats(
            num_sources_considered=10, num_sources_read=4, sources_read_sample=["https://a.example"]
        ),
        progress_meter=12.5,
    )
    assert event.type == "task_run.progress_stats"
    nulls = decode_run_event(
        '{"type":"task_run.progress_stats","progress_meter":0,'
        '"source_stats":{"num_sources_considered":null,"num_sources_read":null,'
        '"sources_read_sample":null}}'
    )
    assert isinstance(nulls, TaskRunProgressStatsEvent)
    assert nulls.source_stats == SourceStats()
    assert nulls.progress_meter == 0.0


@pytest.mark.parametrize(
    "type_", [*sorted(PROGRESS_MSG_TYPES), "task_run.progress_msg.tool", "task_run.progress_msg.x"]
)
def test_progress_message_events_known_and_unknown(type_: str) -> None:
    event = decode_run_event(_json({"type": type_, "message": "hi", "timestamp": None}))
    assert isinstance(event, TaskRunProgressMessageEvent)
    assert event.type == type_
    assert event.kind == type_.rsplit(".", 1)[1]
    assert event.message == "hi"
    assert event.timestamp is None


def test_error_event() -> None:
    data = {"type": "error", "error": {"ref_id": "r1", "message": "boom", "detail": {"k": 1}}}
    event = decode_run_event(_json(data))
    assert isinstance(event, ErrorEvent)
    assert event.type == "error"
    assert event.error.message == "boom"
    assert event.error.ref_id == "r1"
    assert event.error.detail == {"k": 1}
    assert decode_group_event(_json(data)) == event


def test_unknown_type_does_not_raise() -> None:
    data = {"type": "task_run.something_new", "x": [1, {"y": None}]}
    event = decode_run_event(_json(data))
    assert event == UnknownEvent(type="task_run.something_new", data=data)
    assert event.type == "task_run.something_new"
    # groups have no progress messages: one there is unknown, not an error
    progress = {"type": "task_run.progress_msg.plan", "message": "m"}
    assert decode_group_event(_json(progress)) == UnknownEvent(
        type="task_run.progress_msg.plan", data=progress
    )
    # and a group-only type on a run stream is unknown too
    group_status = {"type": "task_group_status", "event_id": "1", "status": GROUP_STATUS}
    assert isinstance(decode_run_event(_json(group_status)), UnknownEvent)


def test_group_status_event() -> None:
    data = {"type": "task_group_status", "event_id": "123", "status": GROUP_STATUS}
    event = decode_group_event(_json(data))
    assert isinstance(event, TaskGroupStatusEvent)
    assert event.type == "task_group_status"
    assert event.event_id == "123"
    assert event.status == TaskGroupStatus(
        num_task_runs=3,
        task_run_status_counts={"completed": 2, "running": 1},
        is_active=True,
        status_message="",
        modified_at="2025-04-23T20:21:48.037943Z",
    )
    state = decode_group_event(_json({"type": "task_run.state", "event_id": "124", "run": RUN}))
    assert isinstance(state, TaskRunStateEvent)
    assert state.event_id == "124"


@pytest.mark.parametrize(
    "data",
    [
        "",
        "not json",
        '{"type": "task_run.state", "run": ',
        b"\xff\xfe",
        "[1, 2]",
        '"task_run.state"',
        '{"message": "no type"}',
        '{"type": 5}',
        '{"type": "task_run.state"}',  # known type, required `run` missing
        '{"type": "task_run.progress_stats", "source_stats": {}, "progress_meter": "x"}',
        '{"type": "task_run.progress_msg.plan"}',  # no message
        '{"type": "error", "error": "boom"}',
    ],
)
def test_malformed_raises_decode_error(data: str | bytes) -> None:
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(DecodeError) as info:
        decode_run_event(data)
    assert info.value.status == 200
    assert info.value.body == raw
    if b"progress" not in raw:  # no progress events on group streams: those are unknown there
        with pytest.raises(DecodeError):
            decode_group_event(data)


def test_task_group_structs() -> None:
    group = msgspec.json.decode(
        _json(
            {
                "taskgroup_id": "tgrp_1",
                "status": GROUP_STATUS,
                "created_at": None,
                "metadata": {"k": "v", "n": 1},
                "extra": True,
            }
        ),
        type=TaskGroup,
    )
    assert group.taskgroup_id == "tgrp_1"
    assert group.status.is_active
    assert group.metadata == {"k": "v", "n": 1}
    added = msgspec.json.decode(
        _json({"status": GROUP_STATUS, "run_ids": ["a"], "run_cursor": None, "event_cursor": ""}),
        type=TaskGroupRunResponse,
    )
    assert added.run_ids == ["a"]
    assert added.run_cursor is None
    assert added.event_cursor == ""


def test_events_through_the_sse_decoder() -> None:
    state = _json({"type": "task_run.state", "event_id": None, "run": RUN})
    msg = _json({"type": "task_run.progress_msg.plan", "message": "m", "timestamp": None})
    stream = f"event: task_run.progress_msg.plan\r\ndata: {msg}\r\n\r\n: ping\r\n\r\n"
    stream += f"event: task_run.state\r\ndata: {state}\r\n\r\n"
    events = [decode_run_event(e.data) for e in decode(stream.encode())]
    assert [e.type for e in events] == ["task_run.progress_msg.plan", "task_run.state"]


# --- the examples of the official OpenAPI document ----------------------------------------------


def _spec_examples() -> list[tuple[str, Any]]:
    spec = json.loads(SPEC.read_text())
    found: list[tuple[str, Any]] = []
    for path, item in spec["paths"].items():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            media = operation.get("responses", {}).get("200", {}).get("content", {})
            example = media.get("text/event-stream", {}).get("example")
            if example is not None:
                found.append((path, example))
    return found


@pytest.mark.skipif(not SPEC.exists(), reason=f"OpenAPI document not found at {SPEC}")
def test_spec_schema_examples_decode() -> None:
    schemas = json.loads(SPEC.read_text())["components"]["schemas"]
    for name in ("TaskGroupStatus", "TaskRunSourceStats"):
        for example in schemas[name].get("examples", []):
            target = TaskGroupStatus if name == "TaskGroupStatus" else SourceStats
            msgspec.convert(example, target)


@pytest.mark.skipif(not SPEC.exists(), reason=f"OpenAPI document not found at {SPEC}")
def test_spec_stream_examples_decode() -> None:
    examples = [(p, e) for p, e in _spec_examples() if "/findall/" not in p and "/tasks/" in p]
    assert examples, "the spec has stream examples for task endpoints"
    seen: set[type] = set()
    for path, example in examples:
        data = _json(example)
        event = decode_group_event(data) if "/groups/" in path else decode_run_event(data)
        assert not isinstance(event, UnknownEvent), (path, example)
        assert event.type == example["type"]
        seen.add(type(event))
    assert {TaskGroupStatusEvent, TaskRunStateEvent, TaskRunProgressMessageEvent} <= seen

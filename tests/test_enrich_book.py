"""The enrichment row book's rules, without I/O: what is sent, what is delivered, in order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from parallel_async._enrich_book import Delivery, Row, RowBook
from parallel_async._journal import RowRecord

_open: list[RowBook] = []


@pytest.fixture(autouse=True)
def _close_books() -> Iterator[None]:
    yield
    while _open:
        b = _open.pop()
        b.close()
        b.out.close()


def book(order: str = "input") -> tuple[RowBook, list[Delivery]]:
    b = RowBook(order, lambda: None)
    _open.append(b)
    return b, []


def drain(b: RowBook, into: list[Delivery]) -> list[tuple[int, str]]:
    while True:
        try:
            into.append(b.out.receive_nowait())
        except Exception:
            break
    return [(d.position, d.status) for d in into]


def rec(status: str, attempt: int = 1, **kw: Any) -> RowRecord:
    return RowRecord(key="k", status=status, run_id=kw.pop("run_id", "trun_1"), attempt=attempt,
                     intent_at=None, **kw)  # fmt: skip


def test_a_new_row_is_sent_once_and_equal_rows_share_it() -> None:
    b, got = book()
    row = b.place(0, {"a": 1}, "k", {"a": 1}, None, retry_failed=False)
    assert row is not None and (row.state, row.attempt, row.input) == ("send", 1, {"a": 1})
    assert b.place(1, {"a": 1}, "k", {"a": 1}, None, retry_failed=False) is None  # same key
    assert b.counts == {"queued": 2, "running": 0}
    b.move(row, "intent")
    assert b.counts == {"queued": 0, "running": 2}
    b.settle(row, "completed", output={"x": 1})
    assert drain(b, got) == [(0, "completed"), (1, "completed")]
    assert b.idle and b.counts == {"queued": 0, "running": 0}
    assert b.outcomes == [("k", "completed", '{"x":1}', None, "")]
    assert "k" not in b.rows


def test_input_order_holds_back_later_rows() -> None:
    b, got = book()
    first = b.place(0, {}, "a", {}, None, retry_failed=False)
    second = b.place(1, {}, "b", {}, None, retry_failed=False)
    assert first is not None and second is not None
    b.settle(second, "failed", error="no")
    assert drain(b, got) == []
    b.settle(first, "completed", output={})
    assert drain(b, got) == [(0, "completed"), (1, "failed")]


def test_completion_order_does_not() -> None:
    b, got = book("completed")
    first = b.place(0, {}, "a", {}, None, retry_failed=False)
    second = b.place(1, {}, "b", {}, None, retry_failed=False)
    assert first is not None and second is not None
    b.settle(second, "completed", output={})
    assert drain(b, got) == [(1, "completed")]


@pytest.mark.parametrize(
    ("journal", "retry", "delivered", "sent_attempt"),
    [
        (rec("completed", output='{"x": 2}'), False, "completed", None),
        (rec("failed", error="no"), False, "failed", None),
        (rec("failed", attempt=2, error="no"), True, None, 3),
        (rec("running"), False, "running", None),  # a result this process could not fetch
        (None, False, None, 1),
    ],
)
def test_what_the_journal_knows_decides(
    journal: RowRecord | None, retry: bool, delivered: str | None, sent_attempt: int | None
) -> None:
    b, got = book()
    row = b.place(0, {}, "k", {}, journal, retry_failed=retry)
    assert (row.attempt if row is not None else None) == sent_attempt
    assert drain(b, got) == ([(0, delivered)] if delivered else [])
    if delivered:
        assert got[0].reused == (delivered != "running")  # answered from the journal
    if delivered == "completed":
        assert got[0].output == {"x": 2}


def test_rows_left_by_an_earlier_process() -> None:
    b, got = book()
    b.rows["k"] = running = Row("k", 1, "running", "trun_1")
    b.rows["o"] = Row("o", 1, "orphan")
    b.settle(running, "completed", output={"x": 1})  # its row has not been read yet: kept
    assert b.rows["k"].state == "done" and drain(b, got) == []
    assert b.place(0, {}, "k", {}, None, retry_failed=False) is None
    orphan = b.place(1, {}, "o", {"i": 1}, None, retry_failed=False)
    assert orphan is not None and orphan.state == "send" and orphan.input == {"i": 1}
    assert drain(b, got) == [(0, "completed")]
    assert got[0].run_id == "trun_1" and got[0].reused


def test_the_deadline_delivers_rows_as_they_stand() -> None:
    b, got = book()
    sent = b.place(0, {}, "a", {}, None, retry_failed=False)
    b.place(1, {}, "b", {}, None, retry_failed=False)
    assert sent is not None
    b.move(sent, "intent")
    b.expire()
    assert drain(b, got) == [(0, "running"), (1, "pending")]
    assert b.idle and b.counts == {"queued": 0, "running": 0}
    b.after_deadline(2, {}, "c", None)
    b.after_deadline(3, {}, "d", rec("completed", output="{}"))
    b.after_deadline(4, {}, "e", rec("intent", run_id=None))
    assert drain(b, got)[2:] == [(2, "pending"), (3, "completed"), (4, "running")]


def test_a_failed_fetch_is_delivered_running_and_not_journaled() -> None:
    b, got = book()
    row = b.place(0, {}, "a", {}, None, retry_failed=False)
    assert row is not None
    b.move(row, "fetch")
    b.settle(row, "running", error="its result could not be fetched")
    assert drain(b, got) == [(0, "running")]
    assert b.outcomes == []
    assert b.delivered["running"] == 1

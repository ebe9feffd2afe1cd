"""Webhook verification, the signer, dedup and ``client.webhooks`` dispatch (no network)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import msgspec
import pytest
import standardwebhooks
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

import parallel_async
from parallel_async import AsyncParallel, InvalidArgumentError, ParallelError, TaskRun
from parallel_async._webhooks import webhook_betas
from parallel_async.webhooks import (
    WEBHOOK_BETA,
    TaskRunStatusEvent,
    UnknownWebhookEvent,
    WebhookDeduplicator,
    WebhookEvent,
    WebhookResource,
    WebhookVerificationError,
    event_payload,
    sign,
    verify,
)

RAW = "raw-secret-7f3a"
WHSEC = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
RUN = TaskRun(
    run_id="trun_9907962f83aa4d9d98fd7f4bf745d654",
    interaction_id="trun_9907962f83aa4d9d98fd7f4bf745d654",
    status="completed",
    is_active=False,
    processor="base",
    metadata={"company": "Acme"},
)


def _hmac_headers(body: bytes, key: bytes, webhook_id: str = "whevent_1") -> dict[str, str]:
    """Signed headers computed from the reference alone (not with the code under test)."""
    stamp = str(int(time.time()))
    digest = hmac.new(key, f"{webhook_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": stamp,
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


def _raises(payload: Any, headers: Any, secret: Any = RAW, **kw: Any) -> str:
    with pytest.raises(WebhookVerificationError) as info:
        verify(payload, headers, secret, **kw)
    return str(info.value)


# --- verification -------------------------------------------------------------------------------


def test_a_signed_status_event_verifies_into_a_typed_event() -> None:
    body = event_payload(RUN, timestamp="2025-04-23T20:21:48.037943Z")
    event = verify(body, sign(body, RAW, webhook_id="whevent_abc"), RAW)
    assert isinstance(event, TaskRunStatusEvent)
    assert event.type == "task_run.status"
    assert event.timestamp == "2025-04-23T20:21:48.037943Z"
    assert event.webhook_id == "whevent_abc"
    assert event.data == RUN
    assert isinstance(event.data, TaskRun)
    assert issubclass(WebhookVerificationError, ParallelError)
    assert parallel_async.WebhookVerificationError is WebhookVerificationError


def test_a_raw_secret_is_the_hmac_key_as_parallel_docs_say() -> None:
    body = event_payload(RUN)
    event = verify(body, _hmac_headers(body, RAW.encode()), RAW)
    assert isinstance(event, TaskRunStatusEvent)
    # the standardwebhooks package always base64-decodes, so it refuses Parallel's raw form
    with pytest.raises(Exception):  # noqa: B017, PT011 - whichever it raises
        standardwebhooks.Webhook(RAW).verify(body, _hmac_headers(body, RAW.encode()))


def test_a_whsec_secret_is_base64_after_the_prefix_and_agrees_with_standardwebhooks() -> None:
    body = event_payload(RUN)
    key = base64.b64decode(WHSEC[len("whsec_") :])
    assert isinstance(verify(body, _hmac_headers(body, key), WHSEC), TaskRunStatusEvent)
    theirs = standardwebhooks.Webhook(WHSEC)
    assert theirs.verify(body, sign(body, WHSEC)) == json.loads(body)
    from datetime import datetime, timezone

    signature = theirs.sign("whevent_9", datetime.now(timezone.utc), body.decode())
    headers = {
        "webhook-id": "whevent_9",
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": signature,
    }
    assert verify(body, headers, WHSEC).webhook_id == "whevent_9"
    unpadded = WHSEC.rstrip("=")
    assert verify(body, headers, unpadded).webhook_id == "whevent_9"


def test_bytes_secret_and_bytes_like_payloads() -> None:
    body = event_payload(RUN)
    headers = _hmac_headers(body, b"\x00\xffkey")
    assert verify(body, headers, b"\x00\xffkey").type == "task_run.status"
    assert verify(bytearray(body), headers, b"\x00\xffkey").type == "task_run.status"
    assert verify(memoryview(body), headers, b"\x00\xffkey").type == "task_run.status"
    # the exact text of the body re-encodes to the same bytes
    assert verify(body.decode(), headers, b"\x00\xffkey").type == "task_run.status"


def test_rotation_any_secret_of_a_list_and_any_of_several_signatures() -> None:
    body = event_payload(RUN)
    headers = _hmac_headers(body, b"new-secret")
    assert verify(body, headers, ["old-secret", "new-secret"]).type == "task_run.status"
    both = sign(body, ["old-secret", WHSEC])
    assert len(both["webhook-signature"].split()) == 2
    assert verify(body, both, WHSEC).type == "task_run.status"
    assert verify(body, both, "old-secret").type == "task_run.status"
    # a v1 signature among unknown versions and junk still matches
    mixed = dict(headers)
    mixed["webhook-signature"] = (
        "v2,abc v1,not-base64!! v1a,xyz " + headers["webhook-signature"] + " v1,"
    )
    assert verify(body, mixed, "new-secret").type == "task_run.status"
    only_other_versions = dict(headers)
    only_other_versions["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
    assert "no v1 signature matches" in _raises(body, only_other_versions, "new-secret")


def test_header_names_in_any_case_and_every_header_container() -> None:
    body = event_payload(RUN)
    headers = sign(body, RAW)
    upper = {k.upper(): v for k, v in headers.items()}
    mixed = {k.title(): v for k, v in headers.items()}
    asgi = [(k.encode(), v.encode()) for k, v in mixed.items()]
    for container in (upper, mixed, CIMultiDict(mixed), asgi, list(mixed.items())):
        assert verify(body, container, RAW).type == "task_run.status"


def test_tampering_and_wrong_secrets_are_refused() -> None:
    body = event_payload(RUN)
    headers = sign(body, RAW)
    assert "no v1 signature" in _raises(body + b" ", headers)
    assert "no v1 signature" in _raises(body.replace(b"completed", b"failed"), headers)
    assert "no v1 signature" in _raises(body, headers, "another-secret")
    assert "no v1 signature" in _raises(body, {**headers, "webhook-id": "whevent_other"})
    later = str(int(headers["webhook-timestamp"]) + 1)
    assert "no v1 signature" in _raises(body, {**headers, "webhook-timestamp": later})
    assert "secrets" in _raises(body, headers, ["a", "b"])


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_each_missing_or_empty_header_is_named(name: str) -> None:
    body = event_payload(RUN)
    headers = sign(body, RAW)
    del headers[name]
    assert name in _raises(body, headers)
    assert name in _raises(body, {**headers, name: ""})


@pytest.mark.parametrize(
    "stamp", ["abc", "-5", "+5", "1.5", "١٢٣٤", "9" * 13, " 1700000000", "1e9"]
)
def test_malformed_timestamps_are_refused(stamp: str) -> None:
    body = event_payload(RUN)
    assert "webhook-timestamp" in _raises(body, {**sign(body, RAW), "webhook-timestamp": stamp})


def test_timestamps_outside_the_tolerance_either_way() -> None:
    body = event_payload(RUN)
    now = time.time()
    assert "old" in _raises(body, sign(body, RAW, timestamp=now - 400))
    assert "future" in _raises(body, sign(body, RAW, timestamp=now + 400))
    assert verify(body, sign(body, RAW, timestamp=now - 250), RAW).type == "task_run.status"
    assert verify(body, sign(body, RAW, timestamp=now + 250), RAW).type == "task_run.status"
    assert "old" in _raises(body, sign(body, RAW, timestamp=now - 60), tolerance=10)
    assert verify(body, sign(body, RAW, timestamp=now - 900), RAW, tolerance=1000).data == RUN
    for bad in (-1, float("nan"), float("inf"), "300", True):
        assert "tolerance" in _raises(body, sign(body, RAW), tolerance=bad)


def test_malformed_id_header_is_refused() -> None:
    body = event_payload(RUN)
    for webhook_id in ("x" * 300, "id\nwith-newline", "idé"):
        headers = {**sign(body, RAW), "webhook-id": webhook_id}
        assert "webhook-id" in _raises(body, headers)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"timestamp": "t"}',
        b'{"type": 5, "data": {}}',
        b'{"type": "task_run.status", "data": {"run_id": "trun_1"}, "timestamp": "t"}',
        b'{"type": "task_run.status", "timestamp": "t"}',
        b'{"type": "task_run.status", "data": {}}',
        b'{"type": "task_run.status", "timestamp": 5, "data": {}}',
        b'{"timestamp": "t", "data": {"run_id": "r", "status": "completed", "is_active": false,'
        b' "processor": "base"}}',
        b"\xff\xfe",
    ],
)
def test_a_correctly_signed_body_that_is_not_an_event_is_refused(body: bytes) -> None:
    message = _raises(body, sign(body, RAW))
    assert "body" in message


def test_an_unknown_event_type_is_returned_not_refused() -> None:
    body = b'{"type": "task_run.progress", "timestamp": "2026-01-01T00:00:00Z", "data": [1, {}]}'
    event = verify(body, sign(body, RAW, webhook_id="whevent_u"), RAW)
    assert isinstance(event, UnknownWebhookEvent)
    assert (event.type, event.timestamp, event.data, event.webhook_id) == (
        "task_run.progress",
        "2026-01-01T00:00:00Z",
        [1, {}],
        "whevent_u",
    )
    bare = b'{"type": "monitor.event"}'
    event = verify(bare, sign(bare, RAW), RAW)
    assert isinstance(event, UnknownWebhookEvent)
    assert event.data is None
    assert event.timestamp is None


@pytest.mark.parametrize("secret", ["", b"", [], "whsec_!!!", "whsec_", None, 5, [RAW, 5]])
def test_malformed_secrets_raise_the_verification_error_too(secret: Any) -> None:
    body = event_payload(RUN)
    message = _raises(body, sign(body, RAW), secret)
    assert "secret" in message


@pytest.mark.parametrize("headers", [None, 5, "webhook-id: x", b"", [("a", "b", "c")], [5]])
def test_headers_of_the_wrong_shape_are_refused(headers: Any) -> None:
    _raises(event_payload(RUN), headers)


def test_a_payload_of_the_wrong_type_is_refused() -> None:
    body = event_payload(RUN)
    assert "raw request body" in _raises({"type": "x"}, sign(body, RAW))


class _ExplodingHeaders(dict[str, str]):
    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")


def test_a_header_mapping_that_raises_is_still_a_verification_error() -> None:
    assert "unreadable" in _raises(event_payload(RUN), _ExplodingHeaders())


def test_secrets_never_appear_in_messages_or_reprs() -> None:
    body = event_payload(RUN)
    messages = [
        _raises(body, sign(body, "other"), RAW),
        _raises(body + b"x", sign(body, RAW), [RAW, WHSEC]),
        _raises(body, sign(body, RAW), "whsec_" + "A" * 5),
    ]
    resource = WebhookResource([RAW, WHSEC])
    client = AsyncParallel(api_key="k", webhook_secret=RAW)
    from parallel_async import _webhooks

    texts = [*messages, repr(resource), repr(vars(resource)), repr(vars(client.webhooks))]
    texts.append(repr(vars(_webhooks)))  # the parsed-secret cache included
    texts.append(repr(resource.asgi_app()))
    for text in texts:
        assert RAW not in text
        assert WHSEC[6:] not in text
        assert "0123456789abcdef" not in text


# --- hypothesis: nothing but an event or WebhookVerificationError ---------------------------------

_text_or_bytes = st.one_of(st.text(max_size=40), st.binary(max_size=40))
_header_values = st.one_of(
    st.text(max_size=60),
    st.integers(),
    st.none(),
    st.binary(max_size=20),
    st.from_regex(r"v1,[A-Za-z0-9+/=]{0,50}( v1,[A-Za-z0-9+/=]{0,50})*", fullmatch=True),
    st.integers(min_value=0, max_value=10**13).map(str),
)
_header_names = st.one_of(
    st.sampled_from(["webhook-id", "Webhook-Timestamp", "WEBHOOK-SIGNATURE", "x"]),
    st.text(max_size=20),
    st.binary(max_size=10),
)
_headers = st.one_of(
    st.dictionaries(_header_names, _header_values, max_size=5),
    st.lists(st.tuples(_header_names, _header_values), max_size=5),
    st.lists(st.lists(_header_values, max_size=3), max_size=3),
    st.none(),
    st.integers(),
    st.text(max_size=10),
)
_secrets = st.one_of(
    _text_or_bytes,
    st.lists(_text_or_bytes, max_size=3),
    st.text(max_size=30).map(lambda s: "whsec_" + s),
    st.none(),
    st.integers(),
)
_payloads = st.one_of(st.binary(max_size=200), st.text(max_size=200), st.none(), st.integers())


@settings(max_examples=400, deadline=None)
@given(payload=_payloads, headers=_headers, secret=_secrets, tolerance=st.floats())
def test_arbitrary_input_gives_an_event_or_a_verification_error(
    payload: Any, headers: Any, secret: Any, tolerance: float
) -> None:
    try:
        event = verify(payload, headers, secret, tolerance=tolerance)
    except WebhookVerificationError:
        return
    assert isinstance(event, TaskRunStatusEvent | UnknownWebhookEvent)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.one_of(st.sampled_from(["task_run.status", "x"]), st.text(max_size=20)),
    stamp=st.one_of(st.text(max_size=30), st.integers(), st.none()),
    data=_json,
    secret=st.one_of(st.text(min_size=1, max_size=30), st.binary(min_size=1, max_size=30)),
)
def test_signed_arbitrary_json_gives_an_event_or_a_verification_error(
    kind: str, stamp: Any, data: Any, secret: str | bytes
) -> None:
    if isinstance(secret, str) and secret.startswith("whsec_"):
        secret = secret[6:] or "s"
    body = msgspec.json.encode({"type": kind, "timestamp": stamp, "data": data})
    try:
        event = verify(body, sign(body, secret), secret)
    except WebhookVerificationError:
        assert kind == "task_run.status"  # only a known type can fail to fit
        return
    assert event.type == kind
    if kind != "task_run.status":
        assert isinstance(event, UnknownWebhookEvent)
        assert event.data == data


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_single_byte_changed_in_the_body_is_refused(position: int, flip: int) -> None:
    body = bytearray(event_payload(RUN))
    headers = sign(bytes(body), RAW)
    body[position % len(body)] ^= flip
    _raises(bytes(body), headers)


# --- dedup --------------------------------------------------------------------------------------


def test_dedup_remembers_ids_for_the_ttl_only() -> None:
    now = [1000.0]
    seen = WebhookDeduplicator(ttl=10, max_ids=100, clock=lambda: now[0])
    assert not seen.is_duplicate("a")
    assert seen.is_duplicate("a")
    now[0] += 5
    assert not seen.is_duplicate("b")
    now[0] += 6  # "a" expired, "b" not
    assert not seen.is_duplicate("a")
    assert seen.is_duplicate("b")
    now[0] += 100
    assert not seen.is_duplicate("c")
    assert len(seen) == 1  # everything older was dropped, not kept forever


def test_dedup_memory_is_bounded_by_max_ids() -> None:
    seen = WebhookDeduplicator(ttl=3600, max_ids=1000)
    for i in range(10_000):
        assert not seen.is_duplicate(f"whevent_{i}")
    assert len(seen) == 1000
    assert seen.is_duplicate("whevent_9999")
    assert not seen.is_duplicate("whevent_0")  # forgotten: the oldest go first


@pytest.mark.parametrize(("ttl", "max_ids"), [(0, 10), (-1, 10), (10, 0), (10, 1.5), (True, 5)])
def test_dedup_arguments_are_checked(ttl: Any, max_ids: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        WebhookDeduplicator(ttl=ttl, max_ids=max_ids)


# --- the beta header ----------------------------------------------------------------------------


def test_webhook_betas_adds_the_beta_only_with_a_webhook() -> None:
    hook = {"url": "https://example.com/hook"}
    assert webhook_betas(None, None) is None
    assert webhook_betas(None, ["a"]) == ["a"]
    assert webhook_betas(hook, None) == (WEBHOOK_BETA,)
    assert webhook_betas(hook, ["a"]) == ("a", WEBHOOK_BETA)
    assert webhook_betas(hook, [WEBHOOK_BETA]) == [WEBHOOK_BETA]
    assert webhook_betas(hook, "bad") == "bad"  # left for join_betas to refuse
    assert WEBHOOK_BETA == "webhook-2025-08-12"


# --- client.webhooks ----------------------------------------------------------------------------


def _event(webhook_id: str = "whevent_1", status: str = "completed") -> TaskRunStatusEvent:
    run = msgspec.structs.replace(RUN, status=status)
    return TaskRunStatusEvent(data=run, timestamp="2026-01-01T00:00:00Z", webhook_id=webhook_id)


def test_the_client_takes_its_secret_from_the_argument_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = event_payload(RUN)
    monkeypatch.delenv("PARALLEL_WEBHOOK_SECRET", raising=False)
    client = AsyncParallel(api_key="k")
    assert not client.webhooks.has_secret
    with pytest.raises(WebhookVerificationError, match="PARALLEL_WEBHOOK_SECRET"):
        client.webhooks.unwrap(body, sign(body, RAW))
    with pytest.raises(InvalidArgumentError, match="webhook_secret"):
        client.webhooks.aiohttp_handler()
    with pytest.raises(InvalidArgumentError, match="webhook_secret"):
        client.webhooks.asgi_app()
    monkeypatch.setenv("PARALLEL_WEBHOOK_SECRET", RAW)
    assert AsyncParallel(api_key="k").webhooks.unwrap(body, sign(body, RAW)).data == RUN
    both = AsyncParallel(api_key="k", webhook_secret=["old", WHSEC])
    assert both.webhooks.unwrap(body, sign(body, WHSEC)).data == RUN
    monkeypatch.setenv("PARALLEL_WEBHOOK_SECRET", "whsec_not base64!")
    with pytest.raises(InvalidArgumentError, match="PARALLEL_WEBHOOK_SECRET") as info:
        AsyncParallel(api_key="k")
    assert "not base64!" not in str(info.value)
    with pytest.raises(InvalidArgumentError):
        AsyncParallel(api_key="k", webhook_secret=[])


def test_resource_arguments_are_checked() -> None:
    for kwargs in ({"tolerance": -1}, {"tolerance": "5"}, {"max_body": 0}):
        with pytest.raises(InvalidArgumentError):
            WebhookResource(RAW, **kwargs)
    with pytest.raises(InvalidArgumentError):
        WebhookResource(RAW).on_event("not callable")  # type: ignore[type-var]
    with pytest.raises(InvalidArgumentError):
        WebhookResource(RAW).feed({"type": "task_run.status"})  # type: ignore[arg-type]


def test_feed_drops_repeats_and_calls_the_sink_before_the_callbacks() -> None:
    calls: list[tuple[str, str]] = []
    resource = WebhookResource(RAW, sink=lambda e: calls.append(("sink", e.webhook_id)))
    resource.on_event(lambda e: calls.append(("first", e.webhook_id)))

    @resource.on_event
    def second(event: WebhookEvent) -> None:
        calls.append(("second", event.webhook_id))

    assert resource.feed(_event("whevent_1"))
    assert not resource.feed(_event("whevent_1"))
    assert resource.feed(_event("whevent_2"))
    assert resource.feed(_event(""))  # no id: nothing to dedupe on
    assert resource.feed(_event(""))
    resource.remove_callback(second)
    resource.remove_callback(second)  # not registered any more: no error
    assert resource.feed(_event("whevent_3"))
    assert calls == [
        ("sink", "whevent_1"),
        ("first", "whevent_1"),
        ("second", "whevent_1"),
        ("sink", "whevent_2"),
        ("first", "whevent_2"),
        ("second", "whevent_2"),
        *[("sink", ""), ("first", ""), ("second", "")] * 2,
        ("sink", "whevent_3"),
        ("first", "whevent_3"),
    ]


def test_a_failing_sink_or_callback_is_logged_and_the_rest_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    def bad(event: WebhookEvent) -> None:
        raise ValueError("callback bug")

    def sink(event: WebhookEvent) -> None:
        raise KeyError("sink bug")

    resource = WebhookResource(RAW, sink=sink)
    resource.on_event(bad)
    resource.on_event(lambda e: seen.append(e.webhook_id))
    with caplog.at_level(logging.ERROR, logger="parallel_async.webhooks"):
        assert resource.feed(_event("whevent_7"))
    assert seen == ["whevent_7"]
    assert "sink failed" in caplog.text
    assert "callback bug" in caplog.text
    assert "whevent_7" in caplog.text
    assert RAW not in caplog.text


@pytest.mark.anyio
async def test_async_callbacks_run_as_tasks_and_their_errors_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resource = WebhookResource(RAW)
    done: list[str] = []
    gate = asyncio.Event()

    @resource.on_event
    async def slow(event: WebhookEvent) -> None:
        await gate.wait()
        done.append(event.webhook_id)

    @resource.on_event
    async def broken(event: WebhookEvent) -> None:
        raise ValueError("async callback bug")

    with caplog.at_level(logging.ERROR, logger="parallel_async.webhooks"):
        assert resource.feed(_event("whevent_a"))  # returns at once, the callbacks still run
        assert done == []
        gate.set()
        await resource.drain()
    assert done == ["whevent_a"]
    assert "async callback bug" in caplog.text


@pytest.mark.anyio
async def test_closing_the_client_cancels_callbacks_still_running() -> None:
    client = AsyncParallel(api_key="k", webhook_secret=RAW)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @client.webhooks.on_event
    async def forever(event: WebhookEvent) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async with client:
        client.webhooks.feed(_event())
        await asyncio.wait_for(started.wait(), 30)  # the callback is running
    assert cancelled.is_set()


def test_an_async_callback_fed_without_a_loop_is_logged_not_left_unawaited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resource = WebhookResource(RAW)

    async def needs_loop(event: WebhookEvent) -> None:
        return None

    resource.on_event(needs_loop)
    with caplog.at_level(logging.ERROR, logger="parallel_async.webhooks"):
        assert resource.feed(_event())
    assert "running event loop" in caplog.text


# --- the ASGI receiver, driven through the ASGI protocol ----------------------------------------


async def _asgi(
    app: Any, scope: dict[str, Any], messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    incoming = list(messages)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    return sent


def _http(method: str = "POST", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": "/", "headers": headers or []}


@pytest.mark.anyio
async def test_asgi_app_verifies_dedupes_and_answers() -> None:
    resource = WebhookResource(RAW)
    got: list[WebhookEvent] = []
    resource.on_event(got.append)
    app = resource.asgi_app()
    body = event_payload(RUN)
    headers = [(k.title().encode(), v.encode()) for k, v in sign(body, RAW).items()]
    parts = [
        {"type": "http.request", "body": body[:10], "more_body": True},
        {"type": "http.request", "body": body[10:], "more_body": False},
    ]
    sent = await _asgi(app, _http(headers=headers), parts)
    assert sent[0]["status"] == 204
    again = await _asgi(app, _http(headers=headers), [{"type": "http.request", "body": body}])
    assert again[0]["status"] == 200
    assert json.loads(again[1]["body"]) == {"duplicate": True}
    assert [e.webhook_id for e in got] == [headers[0][1].decode()]
    bad = await _asgi(app, _http(headers=headers), [{"type": "http.request", "body": body + b"x"}])
    assert bad[0]["status"] == 400
    assert "no v1 signature" in json.loads(bad[1]["body"])["error"]


@pytest.mark.anyio
async def test_asgi_app_refuses_other_methods_big_bodies_and_handles_lifespan() -> None:
    resource = WebhookResource(RAW, max_body=100)
    app = resource.asgi_app()
    sent = await _asgi(app, _http("GET"), [])
    assert sent[0]["status"] == 405
    assert (b"allow", b"POST") in sent[0]["headers"]
    big = [{"type": "http.request", "body": b"x" * 101}]
    assert (await _asgi(app, _http(), big))[0]["status"] == 413
    assert await _asgi(app, _http(), []) == []  # sender gone before the body: no answer
    lifespan = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent = await _asgi(app, {"type": "lifespan"}, lifespan)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    sent = await _asgi(app, {"type": "websocket"}, [])
    assert sent == [{"type": "websocket.close", "code": 1008}]

"""The pure core: argument checks, error decoding, Retry-After parsing. No I/O."""

from __future__ import annotations

import dataclasses
import email.utils
import os
import time
from collections.abc import Iterator

import msgspec
import pytest

from parallel_async import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DecodeError,
    InternalServerError,
    InvalidArgumentError,
    JsonSchema,
    NotFoundError,
    PaymentRequiredError,
    PermissionDeniedError,
    RateLimitError,
    TaskRunResult,
    TaskRunTextOutput,
    TaskSpec,
    TextSchema,
    UnprocessableEntityError,
)
from parallel_async._protocol import (
    TASK_RUN_RESULT_DECODER,
    build_run_input,
    convert_task_spec,
    decode,
    encode,
    error_from_response,
    join_betas,
    parse_retry_after,
    validate_id,
)


@pytest.mark.parametrize(
    "bad", ["", "../v1/tasks", "trun_1/../x", "trun 1", "trun_1?x=1", "a" * 129, None, 12]
)
def test_validate_id_refuses_what_could_escape_the_path(bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="run_id must be"):
        validate_id(bad)


def test_validate_id_accepts_real_ids() -> None:
    assert validate_id("trun_9907962f83aa4d9d98fd7f4bf745d654") == (
        "trun_9907962f83aa4d9d98fd7f4bf745d654"
    )


def test_betas_are_joined_in_order_without_duplicates() -> None:
    assert join_betas(["a", "b"], ["b", "c"], None) == "a,b,c"
    assert join_betas(None, []) is None
    with pytest.raises(InvalidArgumentError):
        join_betas("a,b")


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (402, PaymentRequiredError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, InternalServerError),
        (502, InternalServerError),
        (503, InternalServerError),
        (504, InternalServerError),
        (418, APIStatusError),
    ],
)
def test_error_mapping(status: int, cls: type[APIStatusError]) -> None:
    body = b'{"type":"error","error":{"ref_id":"r-1","message":"boom","detail":{"f":1}}}'
    err = error_from_response(status, {"x": "y"}, body)
    assert type(err) is cls
    assert (err.status, err.message, err.ref_id, err.detail, err.body) == (
        status,
        "boom",
        "r-1",
        {"f": 1},
        body,
    )
    assert err.headers == {"x": "y"}
    assert "boom" in str(err) and "r-1" in str(err)


@pytest.mark.parametrize(
    ("body", "message", "detail"),
    [
        (b'{"error":{"message":"m","details":{"a":1}}}', "m", {"a": 1}),  # docs / webhook shape
        (b'{"detail":[{"loc":["body"],"msg":"x","type":"t"}]}', "Request validation error", None),
        (b"<html>bad gateway</html>", "<html>bad gateway</html>", None),
        (b"", "(empty body)", None),
    ],
)
def test_error_bodies_of_every_known_shape(body: bytes, message: str, detail: object) -> None:
    err = error_from_response(502, {}, body)
    assert err.message == message
    if detail is not None:
        assert err.detail == detail
    assert err.body == body


def test_retry_after_seconds_ms_and_http_date() -> None:
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "3600"}) == 3600.0  # no cap
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after({"retry-after": "nonsense"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "-3"}) == 0.0


def test_rate_limit_error_carries_retry_after() -> None:
    err = error_from_response(429, {"retry-after": "7"}, b"{}")
    assert isinstance(err, RateLimitError)
    assert err.retry_after == 7.0


def test_decode_error_keeps_the_raw_body() -> None:
    with pytest.raises(DecodeError) as info:
        decode(TASK_RUN_RESULT_DECODER, 200, b'{"run": ')
    assert info.value.body == b'{"run": '
    assert info.value.status == 200
    with pytest.raises(DecodeError):
        decode(TASK_RUN_RESULT_DECODER, 200, b'{"run": {}, "output": {"type": "json"}}')


def test_text_output_decodes_by_tag_and_ignores_unknown_fields() -> None:
    body = msgspec.json.encode(
        {
            "run": {
                "run_id": "trun_1",
                "status": "completed",
                "is_active": False,
                "processor": "base",
                "created_at": None,
                "modified_at": None,
                "brand_new_field": [1, 2],
            },
            "output": {"type": "text", "content": "# Report", "basis": [], "new": 1},
        }
    )
    result = decode(TASK_RUN_RESULT_DECODER, 200, body)
    assert isinstance(result, TaskRunResult)
    assert isinstance(result.output, TaskRunTextOutput)
    assert result.output.content == "# Report"
    assert result.run.is_terminal


def test_task_spec_shorthands() -> None:
    assert convert_task_spec("a summary") == TaskSpec(output_schema="a summary")
    spec = convert_task_spec({"output_schema": {"json_schema": {"type": "object"}}})
    assert spec.output_schema == JsonSchema(json_schema={"type": "object"})
    spec = convert_task_spec({"output_schema": {"description": "d"}})
    assert spec.output_schema == TextSchema(description="d")
    with pytest.raises(InvalidArgumentError, match="task_spec"):
        convert_task_spec({"output_schema": {"type": "json", "json_schema": 3}})


def test_build_run_input_encodes_only_what_was_given() -> None:
    body = build_run_input(
        input={"company": "Acme"},
        processor="base",
        metadata={"k": "v"},
        webhook={"url": "https://example.com/hook"},
    )
    assert msgspec.json.decode(encode(body)) == {
        "input": {"company": "Acme"},
        "processor": "base",
        "metadata": {"k": "v"},
        "webhook": {"url": "https://example.com/hook", "event_types": ["task_run.status"]},
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input": 3, "processor": "base"}, "input must be a string, a JSON object"),
        ({"input": "", "processor": "base"}, "input must not be empty"),
        ({"input": "x", "processor": ""}, "processor must be"),
        ({"input": "x", "processor": "base", "metadata": {"k" * 17: "v"}}, "1 to 16"),
        ({"input": "x", "processor": "base", "metadata": {"k": "v" * 513}}, "at most 512"),
        ({"input": "x", "processor": "base", "metadata": {"k": [1]}}, "string, number or"),
        ({"input": "x", "processor": "base", "source_policy": {"include_domains": 1}}, "source_"),
        ({"input": "x", "processor": "base", "enable_events": "yes"}, "enable_events"),
    ],
)
def test_bad_create_arguments_say_what_to_fix(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        build_run_input(**kwargs)


@pytest.fixture(params=["ABC-09", "XYZ+07"], ids=["utc+9", "utc-7"])
def local_timezone(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with the process's local time zone set away from UTC, then restore it."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is not available on this platform")
    before = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    try:
        assert time.timezone != 0, "the TZ change did not take effect"
        yield request.param
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


@pytest.mark.usefixtures("local_timezone")
def test_retry_after_http_date_in_minus_0000_is_utc_not_local_time() -> None:
    # email.utils.formatdate() writes "-0000", which parsedate_to_datetime returns naive;
    # read as local time it would be off by the UTC offset (9 h or 7 h here).
    now = time.time()
    date = email.utils.formatdate(now + 120)
    assert date.endswith("-0000")
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(120, abs=1)
    assert parse_retry_after({"retry-after": date}) == pytest.approx(120, abs=2)
    gmt = email.utils.formatdate(now + 120, usegmt=True)
    assert parse_retry_after({"retry-after": gmt}, now=now) == pytest.approx(120, abs=1)


def test_status_code_is_the_status() -> None:
    err = error_from_response(404, {}, b'{"type": "error", "error": {"message": "nope"}}')
    assert isinstance(err, NotFoundError)
    assert err.status_code == err.status == 404
    with pytest.raises(AttributeError):
        err.status_code = 500  # type: ignore[misc]


class _Company(msgspec.Struct):
    name: str
    country: str = "US"


@dataclasses.dataclass
class _Person:
    name: str


def test_typed_input_values_become_json_objects() -> None:
    body = build_run_input(input=_Company(name="Stripe"), processor="base")
    assert body.input == {"name": "Stripe", "country": "US"}
    assert build_run_input(input=_Person(name="Ada"), processor="base").input == {"name": "Ada"}
    with pytest.raises(InvalidArgumentError, match="Struct/dataclass instance"):
        build_run_input(input=_Company, processor="base")  # the type, not an instance


def test_task_spec_and_input_over_the_api_limit_are_refused() -> None:
    spec = {"output_schema": {"type": "text", "description": "d" * 20_000}}
    build_run_input(input="x" * 4_000, processor="base", task_spec=spec)
    with pytest.raises(InvalidArgumentError, match="25,000"):
        build_run_input(input="x" * 6_000, processor="base", task_spec=spec)
    build_run_input(input="x" * 30_000, processor="base")  # no spec: no combined limit

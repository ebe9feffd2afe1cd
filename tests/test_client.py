"""Client construction, lifecycle, headers, and keeping the API key out of everything we print."""

from __future__ import annotations

import logging
import traceback
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from local_server import refused_port, serve_app

import parallel_async
from parallel_async import (
    AsyncParallel,
    AuthenticationError,
    ClientClosedError,
    ConnectError,
    InvalidArgumentError,
    MissingAPIKeyError,
    NotFoundError,
    ParallelError,
    RunTimeoutError,
)
from parallel_async._transport import Transport, open_stream
from parallel_async.testing import FakeParallel, FakeServer, Fault

pytestmark = pytest.mark.anyio

SECRET = "sk-very-secret-key-123"


def test_missing_key_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARALLEL_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="PARALLEL_API_KEY"):
        AsyncParallel()


def test_key_and_base_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARALLEL_API_KEY", SECRET)
    monkeypatch.setenv("PARALLEL_BASE_URL", "http://127.0.0.1:9/")
    client = AsyncParallel()
    assert client.base_url == "http://127.0.0.1:9"
    assert SECRET not in repr(client)
    assert SECRET not in str(vars(client).get("base_url"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_url": "api.parallel.ai"}, "base_url"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"betas": "a,b"}, "betas"),
    ],
)
def test_bad_configuration(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        AsyncParallel(api_key="k", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An API stand-in that records each request's headers."""
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response(
            {"run_id": "trun_1", "status": "queued", "is_active": True, "processor": "base"}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with serve_app(app) as url:
        yield url, seen


async def test_headers_on_every_request(echo_server: tuple[str, list[dict[str, str]]]) -> None:
    url, seen = echo_server
    async with AsyncParallel(api_key=SECRET, base_url=url, betas=["a-1"]) as client:
        await client.task_run.create(input="x", processor="base", betas=["b-2", "a-1"])
        await client.task_run.retrieve("trun_1")
    create, retrieve = seen
    assert create["x-api-key"] == SECRET
    assert create["parallel-beta"] == "a-1,b-2"
    assert create["Content-Type"] == "application/json"
    assert create["User-Agent"].startswith("parallel-async/")
    assert retrieve["parallel-beta"] == "a-1"
    assert retrieve["x-api-key"] == SECRET
    async with AsyncParallel(api_key=SECRET, base_url=url, betas=["a-1"]) as client:
        await client.task_run.retrieve("trun_1")
        client.betas = ["c-3"]  # a later change applies to every following request
        await client.task_run.retrieve("trun_1")
        with pytest.raises(InvalidArgumentError):
            client.betas = "c-3"  # a string, not a list
    assert [h["parallel-beta"] for h in seen[-2:]] == ["a-1", "c-3"]


async def test_lifecycle(fake_server: FakeServer) -> None:
    client = AsyncParallel(api_key="test-key", base_url=fake_server.url)
    async with client:
        await client.task_run.create(input="x", processor="base")
    assert client.is_closed
    await client.aclose()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        async with client:
            pass
    with pytest.raises(RuntimeError, match="closed"):
        await client.task_run.retrieve("trun_1")


async def test_usable_without_async_with(fake_server: FakeServer) -> None:
    client = AsyncParallel(api_key="test-key", base_url=fake_server.url)
    try:
        run = await client.task_run.create(input="x", processor="base")
        assert run.run_id
    finally:
        await client.aclose()


async def test_injected_session_is_used_and_not_closed(fake_server: FakeServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with AsyncParallel(
            api_key="test-key", base_url=fake_server.url, session=session
        ) as client:
            await client.task_run.create(input="x", processor="base")
        assert not session.closed


async def test_a_closed_injected_session_raises_client_closed_error(
    fake_server: FakeServer, fake_parallel: FakeParallel, no_sleep: list[float]
) -> None:
    session = aiohttp.ClientSession()
    async with AsyncParallel(
        api_key="test-key", base_url=fake_server.url, session=session
    ) as client:
        run = await client.task_run.create(input="x", processor="base")
        await session.close()  # its owner closes it while the client still uses it
        seen = dict(fake_parallel.stats.requests)
        with pytest.raises(ClientClosedError, match="aiohttp session is closed") as info:
            await client.task_run.retrieve(run.run_id)
        assert isinstance(info.value, RuntimeError)
        assert isinstance(info.value, ParallelError)
        assert "GET /v1/tasks/runs/" in str(info.value)
        with pytest.raises(ClientClosedError):
            await client.task_run.create(input="y", processor="base")
        with pytest.raises(ClientClosedError):
            async for _ in await client.task_run.events(run.run_id, timeout=5):
                pass
        assert dict(fake_parallel.stats.requests) == seen  # nothing reached the server
        assert no_sleep == []  # and nothing was retried


async def test_transport_refuses_a_closed_session(fake_server: FakeServer) -> None:
    session = aiohttp.ClientSession()
    await session.close()
    transport = Transport(session, fake_server.url, connect_timeout=5.0)
    with pytest.raises(ClientClosedError, match=r"cannot send POST /v1/tasks/runs"):
        await transport.request("POST", "/v1/tasks/runs", headers={}, body=b"{}", read_timeout=5.0)
    with pytest.raises(ClientClosedError, match=r"cannot send GET /v1/tasks/runs/trun_1/events"):
        async with open_stream(
            transport, "/v1/tasks/runs/trun_1/events", headers={}, params=None, read_timeout=5.0
        ):
            pass


async def test_status_errors_carry_status_code(client: AsyncParallel) -> None:
    with pytest.raises(NotFoundError) as info:
        await client.task_run.retrieve("trun_does_not_exist")
    assert info.value.status_code == info.value.status == 404


async def test_connector_is_sized_to_the_fan_out(fake_server: FakeServer) -> None:
    async with AsyncParallel(api_key="k", base_url=fake_server.url, max_in_flight=37) as client:
        client._open()
        assert client._session is not None
        assert client._session.connector is not None
        assert client._session.connector.limit == 37 + 2


def _all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + repr(vars(exc))


async def test_the_key_never_appears_in_errors_or_logs(
    fake_server: FakeServer,
    fake_parallel: FakeParallel,
    caplog: pytest.LogCaptureFixture,
    no_sleep: list[float],
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[ParallelError] = []
    async with AsyncParallel(api_key=SECRET, base_url=fake_server.url) as client:
        assert SECRET not in repr(client)
        # nor in what a traceback printer that shows locals would render
        assert SECRET not in repr(vars(client))
        assert SECRET not in repr(client._headers(None, json_body=True))
        with pytest.raises(AuthenticationError) as auth:
            await client.task_run.create(input="x", processor="base")
        errors.append(auth.value)
        fake_parallel.manual = True
    async with AsyncParallel(api_key="test-key", base_url=fake_server.url) as ok_client:
        run = await ok_client.task_run.create(input="x", processor="base")
    fake_parallel.faults.script("result", [Fault.status(503), Fault.drop()])
    async with AsyncParallel(api_key=SECRET, base_url=fake_server.url) as client:
        with pytest.raises(ParallelError) as other:
            await client.task_run.result(run.run_id, timeout=0.3)
        errors.append(other.value)
    with refused_port() as port:
        async with AsyncParallel(api_key=SECRET, base_url=f"http://127.0.0.1:{port}") as client:
            with pytest.raises(ConnectError) as conn:
                await client.task_run.retrieve("trun_1")
    errors.append(conn.value)
    assert any(isinstance(e, RunTimeoutError | AuthenticationError) for e in errors)
    for err in errors:
        assert SECRET not in _all_text(err)
    assert SECRET not in caplog.text


def test_public_names_are_pinned() -> None:
    assert sorted(parallel_async.__all__) == parallel_async.__all__
    assert set(parallel_async.__all__) == {
        "APIStatusError",
        "APIUnreachableError",
        "AddRunsError",
        "AsyncParallel",
        "AuthenticationError",
        "AutoSchema",
        "BadRequestError",
        "CircuitBreaker",
        "Citation",
        "ClientClosedError",
        "ClientStateError",
        "ClusterError",
        "Completed",
        "ConflictError",
        "ConnectError",
        "CreateTimeoutError",
        "DecodeError",
        "DisconnectedError",
        "EnrichProgress",
        "EnrichSummary",
        "EnrichedRow",
        "Enrichment",
        "ErrorEvent",
        "ErrorObject",
        "ErrorResponse",
        "Failed",
        "EventStream",
        "EventTooLargeError",
        "FieldBasis",
        "FieldSpecError",
        "GroupEvent",
        "InternalServerError",
        "InvalidArgumentError",
        "JournalError",
        "JsonSchema",
        "LedgerError",
        "McpServer",
        "McpToolCall",
        "MissingAPIKeyError",
        "MissingDependencyError",
        "NotFoundError",
        "Outcome",
        "Outcomes",
        "OutputField",
        "OutputSpec",
        "OutputValidationError",
        "ParallelError",
        "ParsedTaskRunJsonOutput",
        "ParsedTaskRunResult",
        "PaymentRequiredError",
        "PermissionDeniedError",
        "Progress",
        "RateLimitError",
        "RetryPolicy",
        "RunCancelledError",
        "RunError",
        "RunEvent",
        "RunFailedError",
        "RunInput",
        "RunNotFoundError",
        "RunStatus",
        "RunTimeoutError",
        "SchemaError",
        "SourcePolicy",
        "SourceStats",
        "TaskAdvancedSettings",
        "TaskGroup",
        "TaskGroupRunResponse",
        "TaskGroupStatus",
        "TaskGroupStatusEvent",
        "TaskRun",
        "TaskRunJsonOutput",
        "TaskRunProgressMessageEvent",
        "TaskRunProgressStatsEvent",
        "TaskRunResult",
        "TaskRunStateEvent",
        "TaskRunStatusEvent",
        "TaskRunTextOutput",
        "TaskSpec",
        "TextSchema",
        "TransportError",
        "TransportTimeoutError",
        "UnknownEvent",
        "UnknownWebhookEvent",
        "UnprocessableEntityError",
        "Warning",
        "Webhook",
        "WebhookEvent",
        "WebhookVerificationError",
        "WrongEventLoopError",
        "__version__",
        "enrich_sync",
        "job_fingerprint",
        "json_schema_for",
        "output_spec",
        "row_key",
    }
    for name in parallel_async.__all__:
        assert hasattr(parallel_async, name), name

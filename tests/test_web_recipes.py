"""The web-app recipes of docs/web-apps.md, served for real with the fake server behind them.

``docs/examples/fastapi_app.py`` runs under uvicorn and ``docs/examples/aiohttp_app.py`` under an
``aiohttp.web`` runner, each on 127.0.0.1 and an ephemeral port; these tests talk HTTP to them,
and the fake delivers its webhooks to them over HTTP too. Every test runs against both apps.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import uvicorn
from aiohttp import web

from parallel_async.testing import FakeParallel, FakeServer
from parallel_async.webhooks import event_payload, sign

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
SECRET = "recipe-webhook-secret"
FAST = (0.01, 0.02, 0.05)

pytestmark = pytest.mark.anyio


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and FastAPI resolve names through it
    spec.loader.exec_module(module)
    return module


FASTAPI_APP = _load("fastapi_app")
AIOHTTP_APP = _load("aiohttp_app")


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


@asynccontextmanager
async def _serve_fastapi(webhooks: bool, max_in_flight: int) -> AsyncIterator[str]:
    sock = _bound_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = FASTAPI_APP.create_app(public_url=url if webhooks else None, max_in_flight=max_in_flight)
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        log_level="warning",
        access_log=False,
        ws="none",
        http="h11",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield url
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def _serve_aiohttp(webhooks: bool, max_in_flight: int) -> AsyncIterator[str]:
    sock = _bound_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = AIOHTTP_APP.create_app(public_url=url if webhooks else None, max_in_flight=max_in_flight)
    # handler_cancellation: a client hanging up cancels its handler (as the recipe says to run it)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield url
    finally:
        await runner.cleanup()
        sock.close()


@dataclass
class Recipe:
    url: str
    fake: FakeParallel
    kind: str


@pytest.fixture(params=["fastapi", "aiohttp"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("PARALLEL_API_KEY", "test-key")
    monkeypatch.setenv("PARALLEL_WEBHOOK_SECRET", SECRET)
    monkeypatch.delenv("PUBLIC_URL", raising=False)
    return monkeypatch


@asynccontextmanager
async def serving(
    kind: str,
    env: pytest.MonkeyPatch,
    *,
    webhooks: bool = True,
    max_in_flight: int = 16,
    **fake_options: Any,
) -> AsyncIterator[Recipe]:
    fake = FakeParallel(webhook_secret=SECRET, webhook_retry_delays=FAST, **fake_options)
    try:
        async with FakeServer(fake) as server:
            env.setenv("PARALLEL_BASE_URL", server.url)
            serve = _serve_fastapi if kind == "fastapi" else _serve_aiohttp
            async with serve(webhooks, max_in_flight) as url:
                yield Recipe(url=url, fake=fake, kind=kind)
    finally:
        fake.close()


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition the test cannot be told about (state in another component)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def _json(resp: aiohttp.ClientResponse) -> Any:
    return await resp.json(content_type=None)


async def test_research_waits_for_the_run_and_answers_its_output(
    kind: str, env: pytest.MonkeyPatch
) -> None:
    async with serving(kind, env, duration=0.05) as app, aiohttp.ClientSession() as http:
        async with http.post(f"{app.url}/research", json={"input": "Acme Corp"}) as resp:
            assert resp.status == 200
            body = await _json(resp)
        assert body["status"] == "completed"
        assert body["run_id"] in app.fake.runs
        assert body["output"]
        async with http.post(f"{app.url}/research", json={"input": "x", "processor": "nope"}) as r:
            assert r.status == 502  # the API refused the processor (403)
        async with http.get(f"{app.url}/runs/not%20an%20id") as r:
            assert r.status == 400
        async with http.get(f"{app.url}/runs/trun_{'0' * 32}") as r:
            assert r.status == 404


async def test_504_when_the_request_timeout_passes_and_the_run_goes_on(
    kind: str, env: pytest.MonkeyPatch
) -> None:
    async with serving(kind, env, manual=True) as app, aiohttp.ClientSession() as http:
        async with http.post(f"{app.url}/research?timeout=0.3", json={"input": "slow"}) as resp:
            assert resp.status == 504
            body = await _json(resp)
            assert resp.headers["Location"] == f"/runs/{body['run_id']}"
        run_id = body["run_id"]
        assert body["status"] == "running"
        assert app.fake.runs[run_id].is_active  # nothing stopped it
        async with http.get(f"{app.url}/runs/{run_id}") as resp:
            assert (await _json(resp))["status"] == "running"
        app.fake.complete(run_id, {"answer": 42})
        await app.fake.webhooks.wait_idle(timeout=5)
        async with http.get(f"{app.url}/runs/{run_id}") as resp:
            later = await _json(resp)
        assert later == {"run_id": run_id, "status": "completed", "output": {"answer": 42}}


async def test_a_client_disconnect_cancels_only_that_requests_wait(
    kind: str, env: pytest.MonkeyPatch
) -> None:
    # no webhooks, max_long_poll=None: each waiting request holds one /result long-poll
    async with serving(kind, env, webhooks=False, manual=True, max_long_poll=None) as app:
        stats = app.fake.stats

        async def ask(i: int) -> tuple[int, Any]:
            async with aiohttp.ClientSession() as http:  # its own connection
                url = f"{app.url}/research?timeout=60"
                async with http.post(url, json={"input": f"q{i}"}) as resp:
                    return resp.status, await _json(resp)

        tasks = [asyncio.create_task(ask(i)) for i in range(3)]
        await _until(lambda: stats.result_in_flight == 3)
        tasks[0].cancel()  # this browser leaves: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        await _until(lambda: stats.result_in_flight == 2)  # its wait ended, not the others
        assert not any(t.done() for t in tasks[1:])
        for run_id in list(app.fake.runs):
            app.fake.complete(run_id, {"done": run_id})
        answers = await asyncio.gather(*tasks[1:])
        assert [status for status, _ in answers] == [200, 200]
        assert {b["output"]["done"] for _, b in answers} == {b["run_id"] for _, b in answers}
        assert len(app.fake.runs) == 3  # the abandoned run went on server-side


async def test_1000_concurrent_requests_use_at_most_max_in_flight_plus_2_connections(
    kind: str, env: pytest.MonkeyPatch
) -> None:
    width = 20
    async with serving(kind, env, webhooks=False, max_in_flight=width) as app:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def ask(i: int) -> int:
                async with http.post(f"{app.url}/research", json={"input": f"q{i}"}) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(ask(i) for i in range(1000)))
        stats = app.fake.stats
        assert statuses == [200] * 1000
        assert stats.runs_created == 1000
        assert stats.max_open_connections <= width + 2
        assert stats.max_requests_in_flight <= width + 2


async def test_202_then_the_webhook_tells_the_app_how_the_run_ended(
    kind: str, env: pytest.MonkeyPatch
) -> None:
    async with serving(kind, env, manual=True) as app, aiohttp.ClientSession() as http:
        async with http.post(f"{app.url}/runs", json={"input": "Acme"}) as resp:
            assert resp.status == 202
            started = await _json(resp)
        run_id = started["run_id"]
        assert resp.headers["Location"] == f"/runs/{run_id}"
        async with http.post(f"{app.url}/runs", json={"input": "Bad"}) as resp:
            failing = (await _json(resp))["run_id"]
        app.fake.complete(run_id, {"ceo": "Ada"})
        app.fake.fail(failing, "no sources found")
        await app.fake.webhooks.wait_idle(timeout=5)
        deliveries = {d.run_id: d for d in app.fake.webhooks.deliveries}
        assert deliveries[run_id].attempts == [204]
        assert deliveries[failing].attempts == [204]
        result_requests = app.fake.stats.requests["result"]
        async with http.get(f"{app.url}/runs/{failing}") as resp:
            assert await _json(resp) == {
                "run_id": failing,
                "status": "failed",
                "error": "no sources found",
            }
        async with http.get(f"{app.url}/runs/{run_id}") as resp:
            assert await _json(resp) == {
                "run_id": run_id,
                "status": "completed",
                "output": {"ceo": "Ada"},
            }
        assert app.fake.stats.requests["result"] == result_requests + 1  # read once, on demand
        assert app.fake.stats.requests["retrieve"] == 0  # the webhooks told the status


async def test_the_receiver_refuses_forged_or_stale_deliveries(
    kind: str, env: pytest.MonkeyPatch
) -> None:
    async with serving(kind, env) as app, aiohttp.ClientSession() as http:
        hook = f"{app.url}/webhooks/parallel"
        run = {"run_id": "trun_1", "status": "failed", "is_active": False, "processor": "base"}
        body = event_payload({**run, "error": {"message": "out of credit"}})
        for headers in (
            sign(body, "not-the-secret"),
            sign(body, SECRET, timestamp=time.time() - 3600),
            {"content-type": "application/json"},
        ):
            async with http.post(hook, data=body, headers=headers) as resp:
                assert resp.status == 400
        async with http.post(hook, data=body, headers=sign(body, SECRET)) as resp:
            assert resp.status == 204
        async with http.get(f"{app.url}/runs/trun_1") as resp:  # told by the webhook
            assert await _json(resp) == {
                "run_id": "trun_1",
                "status": "failed",
                "error": "out of credit",
            }
        async with http.get(hook) as resp:
            assert resp.status == 405


def _sse(text: str) -> list[tuple[str, str]]:
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], fields.get("data", "")))
    return events


async def test_the_sse_relay_streams_a_runs_progress_to_the_end(
    kind: str, env: pytest.MonkeyPatch
) -> None:
    import json

    async with serving(kind, env, duration=0.3) as app, aiohttp.ClientSession() as http:
        async with http.post(f"{app.url}/runs", json={"input": "Acme"}) as resp:
            run_id = (await _json(resp))["run_id"]
        async with http.get(f"{app.url}/runs/{run_id}/events") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = _sse(await resp.text())  # ends when the run does
    kinds = [k for k, _ in events]
    assert kinds[0] == "task_run.state"
    assert "task_run.progress_msg.plan" in kinds
    assert kinds[-1] == "task_run.state"
    last = json.loads(events[-1][1])
    assert last["run"]["run_id"] == run_id
    assert last["run"]["status"] == "completed"
    assert last["output"]["content"]
    assert app.fake.stats.streams_open == 0


async def test_leaving_the_sse_relay_closes_the_stream_to_the_api(
    kind: str, env: pytest.MonkeyPatch
) -> None:
    async with serving(kind, env, manual=True) as app:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{app.url}/runs", json={"input": "Acme"}) as resp:
                run_id = (await _json(resp))["run_id"]
            async with http.get(f"{app.url}/runs/{run_id}/events") as resp:
                first = await resp.content.readuntil(b"\n\n")
                assert first.startswith(b"event: task_run.state")
                assert app.fake.stats.streams_open == 1
        # the browser left: the app's stream to the API is closed, the run goes on
        await _until(lambda: app.fake.stats.streams_open == 0)
        assert app.fake.runs[run_id].is_active


async def test_the_webhook_path_completes_requests_without_polling_result(
    kind: str, env: pytest.MonkeyPatch
) -> None:
    n = 50
    # Runs last 0.5 s and a /result long-poll is held at most 50 ms: a waiter that polls makes
    # ~10 requests per run; one woken by the webhook fetches the result once.
    async with serving(kind, env, duration=0.5, max_long_poll=0.05) as app:
        async with aiohttp.ClientSession() as http:

            async def ask(i: int) -> int:
                async with http.post(f"{app.url}/research", json={"input": f"q{i}"}) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(ask(i) for i in range(n)))
        assert statuses == [200] * n
        assert app.fake.webhooks.count("delivered") == n
        assert app.fake.stats.requests["result"] <= 1.3 * n

"""A FastAPI app on one shared AsyncParallel client (the recipe of docs/web-apps.md).

    PARALLEL_API_KEY=... PARALLEL_WEBHOOK_SECRET=... PUBLIC_URL=https://app.example.com \\
        uvicorn --factory fastapi_app:create_app

Endpoints:

* ``POST /research?timeout=30``: start a run and wait for it, at most ``timeout`` seconds (504
  with the run id when that passes: the run goes on, ask ``GET /runs/{run_id}`` later). A client
  that hangs up cancels its own wait, nobody else's.
* ``POST /runs``: start a run with a webhook and answer 202 at once.
* ``POST /webhooks/parallel``: the webhook receiver (``client.webhooks.asgi_app()``).
* ``GET /runs/{run_id}``: how the run ended (told by its webhook), else its status.
* ``GET /runs/{run_id}/events``: the run's progress relayed as server-sent events.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import msgspec
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.routing import Route

from parallel_async import (
    AsyncParallel,
    InvalidArgumentError,
    NotFoundError,
    ParallelError,
    RunError,
    RunTimeoutError,
    TaskRunStatusEvent,
    Webhook,
)
from parallel_async.webhooks import WebhookEvent

T = TypeVar("T")
WEBHOOK_PATH = "/webhooks/parallel"
MAX_WAIT = 300.0


class ResearchRequest(BaseModel):
    input: str
    processor: str = "base"


@dataclass
class Parallel:
    """What the endpoints share: the client, the webhook to give runs, how runs ended."""

    client: AsyncParallel
    webhook: Webhook | None
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # use your database

    def remember(self, event: WebhookEvent) -> None:
        """Webhook callback; it runs in the receiver before it answers, so no I/O here."""
        if isinstance(event, TaskRunStatusEvent):  # other event kinds: not used here
            run = event.data
            entry: dict[str, Any] = {"run_id": run.run_id, "status": run.status}
            if run.error is not None:
                entry["error"] = run.error.message
            self.finished[run.run_id] = entry


def parallel(request: Request) -> Parallel:
    shared: Parallel = request.app.state.parallel
    return shared


Shared = Annotated[Parallel, Depends(parallel)]
router = APIRouter()


async def wait_or_disconnect(request: Request, awaitable: Awaitable[T]) -> tuple[bool, T | None]:
    """Await ``awaitable`` unless the HTTP client hangs up first: ``(finished, value)``.

    Uvicorn does not cancel an endpoint whose client left, so we watch for the disconnect
    ourselves: it cancels this request's wait and nothing else.
    """
    wait = asyncio.ensure_future(awaitable)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        wait.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return True, await wait
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            return False, None  # cancelled by the disconnect, not from outside
        raise
    finally:
        watcher.cancel()


@router.post("/research")
async def research(
    body: ResearchRequest, request: Request, p: Shared, timeout: float = 30.0
) -> Response:
    if not 0 < timeout <= MAX_WAIT:
        return JSONResponse({"error": f"timeout must be in (0, {MAX_WAIT:g}]"}, 422)
    run = await p.client.task_run.create(
        input=body.input, processor=body.processor, webhook=p.webhook
    )
    try:
        done, result = await wait_or_disconnect(
            request, p.client.task_run.result(run.run_id, timeout=timeout)
        )
    except RunTimeoutError as exc:
        return JSONResponse(
            {"run_id": run.run_id, "status": exc.last_status or "running"},
            status_code=504,
            headers={"Location": f"/runs/{run.run_id}"},
        )
    except RunError as exc:
        return JSONResponse({"run_id": run.run_id, "error": str(exc)}, status_code=502)
    if not done or result is None:
        return Response(status_code=499)  # nobody is listening any more
    output = msgspec.to_builtins(result.output.content)
    return JSONResponse({"run_id": run.run_id, "status": "completed", "output": output})


@router.post("/runs", status_code=202)
async def start(body: ResearchRequest, p: Shared) -> JSONResponse:
    if p.webhook is None:
        return JSONResponse({"error": "set PUBLIC_URL to receive webhooks"}, 503)
    run = await p.client.task_run.create(
        input=body.input, processor=body.processor, webhook=p.webhook
    )
    return JSONResponse(
        {"run_id": run.run_id, "status": run.status},
        status_code=202,
        headers={"Location": f"/runs/{run.run_id}"},
    )


@router.get("/runs/{run_id}")
async def status(run_id: str, p: Shared) -> JSONResponse:
    entry = p.finished.get(run_id)
    if entry is None:  # no webhook yet: ask the API
        try:
            run = await p.client.task_run.retrieve(run_id)
        except NotFoundError:
            return JSONResponse({"error": f"no run {run_id}"}, status_code=404)
        entry = {"run_id": run.run_id, "status": run.status}
    if entry["status"] == "completed" and "output" not in entry:
        result = await p.client.task_run.result(run_id, timeout=60)  # answers at once
        entry["output"] = msgspec.to_builtins(result.output.content)
        p.finished[run_id] = entry
    return JSONResponse(entry)


@router.get("/runs/{run_id}/events")
async def events(run_id: str, p: Shared) -> StreamingResponse:
    stream = await p.client.task_run.events(run_id)

    async def relay() -> AsyncIterator[bytes]:
        # Starlette cancels this generator when the browser leaves: the stream closes too.
        async with stream:
            try:
                async for event in stream:
                    data = msgspec.json.encode(event)
                    yield b"event: %s\ndata: %s\n\n" % (event.type.encode(), data)
            except ParallelError as exc:
                yield b"event: error\ndata: %s\n\n" % msgspec.json.encode(str(exc))

    return StreamingResponse(relay(), media_type="text/event-stream")


async def bad_argument(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=400)


async def upstream_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=502)


def create_app(*, public_url: str | None = None, max_in_flight: int = 100) -> FastAPI:
    """The app; ``public_url`` (default ``PUBLIC_URL``) is where the API can reach it."""
    client = AsyncParallel(max_in_flight=max_in_flight)  # key, URL, secret from the environment
    public_url = public_url or os.environ.get("PUBLIC_URL")
    webhook = None if public_url is None else Webhook(url=public_url.rstrip("/") + WEBHOOK_PATH)
    shared = Parallel(client, webhook)
    client.webhooks.on_event(shared.remember)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with client:  # one client (one connection pool) for every request
            yield

    app = FastAPI(lifespan=lifespan)
    app.state.parallel = shared
    app.include_router(router)
    # A plain ASGI app on a route of its own (a mount would redirect the exact path).
    app.router.routes.append(Route(WEBHOOK_PATH, client.webhooks.asgi_app(), methods=["POST"]))
    app.add_exception_handler(InvalidArgumentError, bad_argument)
    app.add_exception_handler(ParallelError, upstream_error)
    return app

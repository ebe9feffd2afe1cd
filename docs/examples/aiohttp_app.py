"""An aiohttp.web app on one shared AsyncParallel client (the recipe of docs/web-apps.md).

    PARALLEL_API_KEY=... PARALLEL_WEBHOOK_SECRET=... PUBLIC_URL=https://app.example.com \\
        python aiohttp_app.py

The same endpoints as the FastAPI recipe: ``POST /research?timeout=30`` (wait, 504 when the
timeout passes), ``POST /runs`` (202, a webhook tells when it ends), ``POST /webhooks/parallel``
(the receiver), ``GET /runs/{run_id}`` and ``GET /runs/{run_id}/events`` (server-sent events).
Serve it with ``handler_cancellation=True``: a client that hangs up then cancels its own wait.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

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

WEBHOOK_PATH = "/webhooks/parallel"
MAX_WAIT = 300.0
CLIENT = web.AppKey("client", AsyncParallel)
WEBHOOK: web.AppKey[Webhook | None] = web.AppKey("webhook")
FINISHED: web.AppKey[dict[str, dict[str, Any]]] = web.AppKey("finished")


class ResearchRequest(msgspec.Struct):
    input: str
    processor: str = "base"


read_request = msgspec.json.Decoder(ResearchRequest)


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except (InvalidArgumentError, msgspec.DecodeError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except ParallelError as exc:
        return web.json_response({"error": str(exc)}, status=502)
    return response


async def research(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    body = read_request.decode(await request.read())
    timeout = float(request.query.get("timeout", "30"))
    if not 0 < timeout <= MAX_WAIT:
        return web.json_response({"error": f"timeout must be in (0, {MAX_WAIT:g}]"}, status=422)
    run = await client.task_run.create(
        input=body.input, processor=body.processor, webhook=request.app[WEBHOOK]
    )
    try:
        # With handler_cancellation=True, a client hanging up cancels this await only.
        result = await client.task_run.result(run.run_id, timeout=timeout)
    except RunTimeoutError as exc:
        return web.json_response(
            {"run_id": run.run_id, "status": exc.last_status or "running"},
            status=504,
            headers={"Location": f"/runs/{run.run_id}"},
        )
    except RunError as exc:
        return web.json_response({"run_id": run.run_id, "error": str(exc)}, status=502)
    output = msgspec.to_builtins(result.output.content)
    return web.json_response({"run_id": run.run_id, "status": "completed", "output": output})


async def start(request: web.Request) -> web.Response:
    webhook = request.app[WEBHOOK]
    if webhook is None:
        return web.json_response({"error": "set PUBLIC_URL to receive webhooks"}, status=503)
    body = read_request.decode(await request.read())
    run = await request.app[CLIENT].task_run.create(
        input=body.input, processor=body.processor, webhook=webhook
    )
    return web.json_response(
        {"run_id": run.run_id, "status": run.status},
        status=202,
        headers={"Location": f"/runs/{run.run_id}"},
    )


async def status(request: web.Request) -> web.Response:
    client, finished = request.app[CLIENT], request.app[FINISHED]
    run_id = request.match_info["run_id"]
    entry = finished.get(run_id)
    if entry is None:  # no webhook yet: ask the API
        try:
            run = await client.task_run.retrieve(run_id)
        except NotFoundError:
            return web.json_response({"error": f"no run {run_id}"}, status=404)
        entry = {"run_id": run.run_id, "status": run.status}
    if entry["status"] == "completed" and "output" not in entry:
        result = await client.task_run.result(run_id, timeout=60)  # answers at once
        entry["output"] = msgspec.to_builtins(result.output.content)
        finished[run_id] = entry
    return web.json_response(entry)


async def events(request: web.Request) -> web.StreamResponse:
    stream = await request.app[CLIENT].task_run.events(request.match_info["run_id"])
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    async with stream:  # closed when the browser leaves (the handler is cancelled)
        try:
            async for event in stream:
                data = msgspec.json.encode(event)
                await response.write(b"event: %s\ndata: %s\n\n" % (event.type.encode(), data))
        except ParallelError as exc:
            await response.write(b"event: error\ndata: %s\n\n" % msgspec.json.encode(str(exc)))
    await response.write_eof()
    return response


def create_app(*, public_url: str | None = None, max_in_flight: int = 100) -> web.Application:
    """The app; ``public_url`` (default ``PUBLIC_URL``) is where the API can reach it."""
    client = AsyncParallel(max_in_flight=max_in_flight)  # key, URL, secret from the environment
    public_url = public_url or os.environ.get("PUBLIC_URL")
    finished: dict[str, dict[str, Any]] = {}  # run id -> how it ended (use your DB)

    @client.webhooks.on_event
    def remember(event: WebhookEvent) -> None:
        # Runs in the receiver before it answers: no I/O here, the output is read on demand.
        if isinstance(event, TaskRunStatusEvent):  # other event kinds: not used here
            run = event.data
            entry: dict[str, Any] = {"run_id": run.run_id, "status": run.status}
            if run.error is not None:
                entry["error"] = run.error.message
            finished[run.run_id] = entry

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        async with client:  # one client (one connection pool) for every request
            yield

    app = web.Application(middlewares=[errors])
    app[CLIENT] = client
    app[WEBHOOK] = (
        None if public_url is None else Webhook(url=public_url.rstrip("/") + WEBHOOK_PATH)
    )
    app[FINISHED] = finished
    app.cleanup_ctx.append(lifespan)
    app.router.add_post("/research", research)
    app.router.add_post("/runs", start)
    app.router.add_get("/runs/{run_id}", status)
    app.router.add_get("/runs/{run_id}/events", events)
    app.router.add_post(WEBHOOK_PATH, client.webhooks.aiohttp_handler())
    return app


if __name__ == "__main__":
    web.run_app(create_app(), handler_cancellation=True)

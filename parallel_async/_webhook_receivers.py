"""``client.webhooks``: verify deliveries with the client's secret, receive them in web apps.

The receivers (an ``aiohttp.web`` handler and a plain ASGI app) read the raw body, verify it,
drop repeats by ``webhook-id``, pass the event on (the client's sink first, then the user's
``on_event`` callbacks) and answer 2xx at once. Passing on is synchronous and quick: the sink
only wakes waiters, sync callbacks run in place, async ones are started as tasks; nothing that
happens there can fail the delivery, so the API is never made to retry because of our code.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from ._defaults import WEBHOOK_POLL_AFTER as DEFAULT_POLL_AFTER
from ._errors import InvalidArgumentError, WebhookVerificationError
from ._webhooks import (
    DEFAULT_TOLERANCE,
    Secret,
    TaskRunStatusEvent,
    UnknownWebhookEvent,
    WebhookDeduplicator,
    WebhookEvent,
    parse_secrets,
    verify_with_keys,
)

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["ENV_SECRET", "WebhookASGIApp", "WebhookCallback", "WebhookResource", "WebhookSink"]

logger = logging.getLogger("parallel_async.webhooks")

ENV_SECRET = "PARALLEL_WEBHOOK_SECRET"  # noqa: S105 - the variable's name, not a secret
DEFAULT_MAX_BODY = 1 << 20  # a run's status event is a few KB

WebhookSink = Callable[[WebhookEvent], None]
"""Called synchronously with each new verified event (the client's run ledger hooks in here)."""
WebhookCallback = Callable[[WebhookEvent], "Awaitable[None] | None"]
"""A user callback: a plain function, or an ``async def`` (run as a task)."""
CallbackT = TypeVar("CallbackT", bound=WebhookCallback)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = (b"content-type", b"application/json")


def _describe(event: WebhookEvent) -> str:
    run = f" (run {event.data.run_id})" if isinstance(event, TaskRunStatusEvent) else ""
    return f"{event.type} {event.webhook_id or '<no id>'}{run}"


class WebhookResource:
    """``client.webhooks``: verify webhook deliveries and receive them in a web app.

        client = AsyncParallel(webhook_secret=os.environ["PARALLEL_WEBHOOK_SECRET"])
        app.router.add_post("/webhooks/parallel", client.webhooks.aiohttp_handler())

        @client.webhooks.on_event
        def finished(event: WebhookEvent) -> None:
            print(event.type, event.data)

    Args:
        secret: ``whsec_<base64>`` or the raw secret, or a list (rotation); default
            ``PARALLEL_WEBHOOK_SECRET``. Never shown in a repr, a log line or an error.
        sink: called with each new verified event before the callbacks (the client's own use).
        tolerance: seconds a delivery's timestamp may be off our clock, either way.
        dedupe: the memory of seen ``webhook-id`` values (default: 1 hour, 50,000 ids).
        max_body: largest body the receivers accept, bytes (413 above it).
    """

    def __init__(
        self,
        secret: Secret | None = None,
        *,
        sink: WebhookSink | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        dedupe: WebhookDeduplicator | None = None,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        if secret is not None:
            self._keys = parse_secrets(secret, InvalidArgumentError)
        else:
            from_env = os.environ.get(ENV_SECRET) or None
            try:
                self._keys = (
                    () if from_env is None else parse_secrets(from_env, InvalidArgumentError)
                )
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"{ENV_SECRET}: {exc}") from None
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, int | float)
            or not 0 <= tolerance < float("inf")
        ):
            raise InvalidArgumentError(f"tolerance must be seconds >= 0, got {tolerance!r}")
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
            raise InvalidArgumentError(f"max_body must be a positive int, got {max_body!r}")
        self._tolerance = float(tolerance)
        self.max_body = max_body
        self.sink = sink
        self.poll_after = DEFAULT_POLL_AFTER
        """The safety net for a run created with a webhook on this client, in seconds (only with
        a secret set). ``result()`` waits for the webhook without polling; from ``poll_after``
        after the create, the run's status is checked every ``poll_after`` (its webhook is due
        only once it has ended), and a check that finds it ended fetches the result at once.
        A lost webhook delays a result by about ``poll_after`` past the run's end at most."""
        self.dedupe = dedupe if dedupe is not None else WebhookDeduplicator()
        self._callbacks: list[WebhookCallback] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return (
            f"WebhookResource(secrets={len(self._keys)} redacted, callbacks={len(self._callbacks)})"
        )

    @property
    def has_secret(self) -> bool:
        """Whether a secret is configured (`unwrap` and the receivers need one)."""
        return bool(self._keys)

    def _require_secret(self) -> None:
        if not self._keys:
            raise InvalidArgumentError(
                f"no webhook secret: pass AsyncParallel(webhook_secret=...) or set {ENV_SECRET}"
            )

    # --- verification and dispatch --------------------------------------------------------------

    def unwrap(
        self,
        payload: bytes | bytearray | memoryview | str,
        headers: Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]],
    ) -> WebhookEvent:
        """Verify a delivery with the client's secret(s); see `parallel_async.webhooks.verify`.

        Raises:
            WebhookVerificationError: for every bad delivery, and when no secret is configured.
        """
        if not self._keys:
            raise WebhookVerificationError(
                f"no webhook secret: pass AsyncParallel(webhook_secret=...) or set {ENV_SECRET}"
            )
        return verify_with_keys(payload, headers, self._keys, self._tolerance)

    def on_event(self, callback: CallbackT) -> CallbackT:
        """Call ``callback(event)`` for every new verified event; usable as a decorator.

        A plain function runs in the receiver, before the answer (keep it quick); an
        ``async def`` runs as a task. An exception is logged (logger ``parallel_async.webhooks``)
        and never fails the delivery.
        """
        if not callable(callback):
            raise InvalidArgumentError(f"on_event needs a callable, got {callback!r}")
        self._callbacks.append(callback)
        return callback

    def remove_callback(self, callback: WebhookCallback) -> None:
        """Stop calling ``callback`` (no error if it was not registered)."""
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def feed(self, event: WebhookEvent) -> bool:
        """Pass on an event received by other means (a queue, another service).

        Repeats of a ``webhook_id`` already seen are dropped. Returns True if the event was new.
        """
        if not isinstance(event, TaskRunStatusEvent | UnknownWebhookEvent):
            raise InvalidArgumentError(
                f"feed() takes a verified webhook event, got {type(event).__name__}"
            )
        if event.webhook_id and self.dedupe.is_duplicate(event.webhook_id):
            logger.debug("webhook %s: repeat delivery dropped", event.webhook_id)
            return False
        sink = self.sink
        if sink is not None:
            try:
                sink(event)
            except Exception:
                logger.exception("the webhook sink failed on %s", _describe(event))
        for callback in tuple(self._callbacks):
            try:
                outcome = callback(event)
                if inspect.isawaitable(outcome):
                    self._start(outcome, event)
            except Exception:
                logger.exception("on_event callback %r failed on %s", callback, _describe(event))
        return True

    def _start(self, awaitable: Awaitable[Any], event: WebhookEvent) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # never started: no "never awaited" warning
            raise InvalidArgumentError(
                "an async on_event callback needs a running event loop"
            ) from None
        task = asyncio.ensure_future(awaitable, loop=loop)
        self._tasks.add(task)

        def done(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                logger.error(
                    "async on_event callback failed on %s",
                    _describe(event),
                    exc_info=task.exception(),
                )

        task.add_done_callback(done)

    async def drain(self) -> None:
        """Wait until the async callbacks started so far have finished."""
        while self._tasks:
            await asyncio.wait(tuple(self._tasks))

    async def aclose(self) -> None:
        """Cancel the async callbacks still running and wait for them (at shutdown)."""
        for task in self._tasks:
            task.cancel()
        await self.drain()

    def _receive(self, body: bytes, headers: object) -> tuple[int, bytes]:
        """The answer to one delivery: (status, JSON body); passes new events on."""
        try:
            event = self.unwrap(body, headers)  # type: ignore[arg-type]
        except WebhookVerificationError as exc:
            logger.warning("webhook refused: %s", exc)
            return 400, msgspec.json.encode({"error": str(exc)})
        if not self.feed(event):
            return 200, b'{"duplicate":true}'
        return 204, b""

    # --- receivers ------------------------------------------------------------------------------

    def aiohttp_handler(self) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """An ``aiohttp.web`` handler receiving deliveries.

            app.router.add_post("/webhooks/parallel", client.webhooks.aiohttp_handler())

        Answers 204 to a new event, 200 to a repeat, 400 to a delivery that fails verification
        (the message says why), 413 to a body over ``max_body``, 405 to anything but POST.
        """
        from aiohttp import web

        self._require_secret()

        async def handle(request: web.Request) -> web.StreamResponse:
            if request.method != "POST":
                return web.Response(status=405, headers={"Allow": "POST"})
            length = request.content_length
            if length is not None and length > self.max_body:
                return web.Response(status=413)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return web.Response(status=413)
            if len(body) > self.max_body:
                return web.Response(status=413)
            status, answer = self._receive(body, request.headers)
            if not answer:
                return web.Response(status=status)
            return web.Response(status=status, body=answer, content_type="application/json")

        return handle

    def asgi_app(self) -> WebhookASGIApp:
        """A plain ASGI app receiving deliveries (no framework needed; mount it anywhere).

        In FastAPI or Starlette: ``app.router.routes.append(Route("/webhooks/parallel",
        client.webhooks.asgi_app(), methods=["POST"]))``. Answers as `aiohttp_handler`.
        """
        self._require_secret()
        return WebhookASGIApp(self)


async def _respond(
    send: Send, status: int, body: bytes = b"", headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    head = [(b"content-length", str(len(body)).encode()), *headers]
    if body:
        head.append(_JSON)
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class WebhookASGIApp:
    """The ASGI receiver of `WebhookResource.asgi_app` (an instance, so routers treat it as an
    ASGI app rather than a request handler)."""

    __slots__ = ("_resource",)

    def __init__(self, resource: WebhookResource) -> None:
        self._resource = resource

    def __repr__(self) -> str:
        return f"WebhookASGIApp({self._resource!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection: lifespan (served on its own), http; others are refused."""
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        if scope.get("method") != "POST":
            await _respond(send, 405, headers=[(b"allow", b"POST")])
            return
        limit = self._resource.max_body
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the sender hung up: nothing to answer, nothing passed on
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _respond(send, 413)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        status, answer = self._resource._receive(b"".join(chunks), scope.get("headers", ()))
        await _respond(send, status, answer)

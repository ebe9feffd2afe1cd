"""The Spark driver's coordinator service: each job's `Coordinator`, reachable over HTTP.

Spark has no actors, so the driver hosts the coordinators of its enrichment jobs in one small
HTTP service (standard library, a thread per request) that the tasks on the executors call
(`HttpLink`). It binds the driver's address (127.0.0.1 for a local master), and every request
must carry the service's secret: a random token sent to the tasks with the job (never the API
key). The service lives as long as the driver process, so a DataFrame computed again later
still finds its job's coordinator.
"""

from __future__ import annotations

import hmac
import http.server
import secrets
import threading
import time
from types import TracebackType
from typing import Any

import aiohttp
import anyio
import msgspec

from ._cluster_limit import Coordinator, Grant
from ._errors import ClusterError

__all__ = ["CoordinatorService", "HttpLink", "service_on"]

_SECRET_HEADER = "x-coordinator-key"  # noqa: S105 - a header name, not a secret
_MAX_BODY = 65_536
_CALL_TIMEOUT = 30.0
_CALL_ATTEMPTS = 5


class _Call(msgspec.Struct, kw_only=True):
    job: str
    op: str
    partition: int = 0
    token: str = ""
    runs: int = 1
    grants: list[int] = msgspec.field(default_factory=list)
    seconds: float = 0.0


_CALL = msgspec.json.Decoder(_Call)
_ENCODER = msgspec.json.Encoder()


class CoordinatorService:
    """The driver's HTTP service hosting job coordinators (see the module docs)."""

    def __init__(self, host: str) -> None:
        self.secret = secrets.token_urlsafe(24)
        self._jobs: dict[str, Coordinator] = {}
        self._lock = threading.Lock()
        service = self

        class Handler(_Handler):
            owner = service

        self._server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        port = self._server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="parallel-async coordinator", daemon=True
        )
        self._thread.start()

    def register(self, coordinator: Coordinator) -> str:
        """Host ``coordinator``; the job id tasks name it by."""
        job = secrets.token_hex(8)
        with self._lock:
            self._jobs[job] = coordinator
        return job

    def coordinator(self, job: str) -> Coordinator:
        """The coordinator of ``job`` (its ``stats`` say what it granted)."""
        with self._lock:
            return self._jobs[job]

    def dispatch(self, call: _Call) -> tuple[int, Any]:
        """Answer one call: (HTTP status, body). Under the service's lock: coordinators are
        not thread-safe."""
        now = time.monotonic()
        with self._lock:
            coordinator = self._jobs.get(call.job)
            if coordinator is None:
                return 404, {"error": "no such job on this driver"}
            if call.op == "begin":
                return 200, {"answer": coordinator.begin(call.partition, call.token, now)}
            if call.op == "acquire":
                grant = coordinator.acquire(call.partition, call.token, call.runs, now)
                return 200, {"answer": grant}
            if call.op == "release":
                coordinator.release(call.partition, call.token, call.grants)
                return 200, {"answer": None}
            if call.op == "pause":
                coordinator.pause(call.seconds, now)
                return 200, {"answer": None}
        return 400, {"error": f"unknown call {call.op!r}"}

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: CoordinatorService

    def do_POST(self) -> None:
        if not hmac.compare_digest(self.headers.get(_SECRET_HEADER, ""), self.owner.secret):
            self._answer(403, {"error": "wrong or missing coordinator key"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= _MAX_BODY:
            self._answer(400, {"error": "bad body size"})
            return
        try:
            call = _CALL.decode(self.rfile.read(length))
        except msgspec.DecodeError as exc:
            self._answer(400, {"error": f"bad call: {exc}"})
            return
        self._answer(*self.owner.dispatch(call))

    def _answer(self, status: int, body: object) -> None:
        data = _ENCODER.encode(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return  # no access log on the driver's stderr


_SERVICES: dict[str, CoordinatorService] = {}
_SERVICES_LOCK = threading.Lock()


def service_on(host: str) -> CoordinatorService:
    """The driver process's coordinator service bound to ``host`` (started on first use)."""
    with _SERVICES_LOCK:
        service = _SERVICES.get(host)
        if service is None:
            try:
                service = CoordinatorService(host)
            except OSError as exc:
                raise ClusterError(
                    f"cannot start the coordinator service on {host}: {exc.strerror or exc}"
                ) from None
            _SERVICES[host] = service
        return service


class _Answer(msgspec.Struct):
    answer: Any = None


_ANSWER = msgspec.json.Decoder(_Answer)


class HttpLink:
    """A task's link to its job's coordinator on the Spark driver (``async with``)."""

    def __init__(self, url: str, secret: str, job: str) -> None:
        self._url = url
        self._secret = secret
        self._job = job
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"HttpLink({self._url!r}, job={self._job!r})"

    async def __aenter__(self) -> HttpLink:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_CALL_TIMEOUT))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, op: str, **fields: Any) -> Any:
        if self._session is None:
            raise ClusterError("the coordinator link is not open")
        body = _ENCODER.encode(_Call(job=self._job, op=op, **fields))
        headers = {_SECRET_HEADER: self._secret, "Content-Type": "application/json"}
        failure: Exception | None = None
        for attempt in range(_CALL_ATTEMPTS):
            if attempt:
                await anyio.sleep(0.2 * 2**attempt)
            try:
                async with self._session.post(f"{self._url}/{op}", data=body, headers=headers) as r:
                    data = await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure = exc
                continue
            if status != 200:
                text = data.decode("utf-8", "replace")[:200]
                raise ClusterError(f"the job's coordinator on the driver answered {status}: {text}")
            return _ANSWER.decode(data).answer
        raise ClusterError(
            f"the job's coordinator on the driver ({self._url}) cannot be reached: {failure}"
        )

    async def begin(self, partition: int, token: str) -> float:
        """See `Coordinator.begin`."""
        return float(await self._call("begin", partition=partition, token=token))

    async def acquire(self, partition: int, token: str, runs: int) -> Grant:
        """See `Coordinator.acquire`."""
        state, wait, grant = await self._call(
            "acquire", partition=partition, token=token, runs=runs
        )
        return str(state), float(wait), int(grant)

    async def release(self, partition: int, token: str, grants: list[int]) -> None:
        """See `Coordinator.release`."""
        await self._call("release", partition=partition, token=token, grants=grants)

    async def pause(self, seconds: float) -> None:
        """See `Coordinator.pause`."""
        await self._call("pause", seconds=seconds)

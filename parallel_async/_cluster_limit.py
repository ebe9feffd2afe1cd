"""One create budget for a whole Spark or Dask job, and one task attempt per partition.

`Coordinator` is pure state (the time is passed in), hosted once per job by the engine: a Dask
actor, or the Spark driver's coordinator service (``_cluster_service``). Every task of the job
asks it before each create request:

* **the budget**: at most ``limit`` creates in any sliding ``window`` seconds, counted in
  requests (an ``add_runs`` request of up to 1,000 runs counts once) or in runs; a 429 seen
  by any task pauses every task (`Coordinator.pause`). The window is widened a little, as
  the single-process `CreateLimiter` does, so requests reaching the server a moment after
  their grant still fit the server's window.
* **the partition's owner**: a task attempt `begins <Coordinator.begin>` its partition with a
  fresh token, and the previous attempt (the engine re-ran the task: a lost executor, a dead
  worker, speculative execution) is superseded: it gets no more grants. The new attempt lists
  its task group only once every create granted to an earlier attempt and not known to be
  answered is ``settle`` seconds old: a request the server still works on shows up in the
  listing by then (the assumption the single-process journal makes too).

`SharedCreateLimiter` puts a coordinator in the client's place of its own limiter: each create
request of the task's client waits for a grant; a 429 pauses the whole job.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import math
import time
from collections import deque
from typing import Literal, Protocol

import anyio

from ._errors import ClusterError, InvalidArgumentError, RunTimeoutError
from ._limiter import CreateLimiter

__all__ = [
    "UNITS",
    "Coordinator",
    "CoordinatorLink",
    "Grant",
    "SharedCreateLimiter",
    "Unit",
    "check_rate",
    "counting",
]

log = logging.getLogger("parallel_async")

Unit = Literal["requests", "runs"]
UNITS: tuple[Unit, ...] = ("requests", "runs")
_EPSILON = 1e-6  # waits end just past the instant, whatever the float rounding

Grant = tuple[str, float, int]
"""A coordinator's answer to ``acquire``: ``("granted", 0, grant id)``, ``("wait", seconds,
0)`` or ``("superseded", 0, 0)``."""


def check_rate(limit: object, window: object, unit: object, settle: object) -> None:
    """Refuse a bad rate-limit setting before anything is sent."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidArgumentError(f"create_rate_limit must be an int >= 1, got {limit!r}")
    if isinstance(window, bool) or not isinstance(window, int | float) or not window > 0:
        raise InvalidArgumentError(f"create_rate_window must be seconds > 0, got {window!r}")
    if not math.isfinite(window):
        raise InvalidArgumentError("create_rate_window must be a finite number of seconds")
    if unit not in UNITS:
        raise InvalidArgumentError(f"create_rate_unit must be 'requests' or 'runs', got {unit!r}")
    if isinstance(settle, bool) or not isinstance(settle, int | float) or not settle >= 0:
        raise InvalidArgumentError(f"reconcile_settle must be seconds >= 0, got {settle!r}")


class Coordinator:
    """The job's create budget and partition owners (pure: every call is given ``now``)."""

    def __init__(self, limit: int, window: float, unit: Unit, settle: float) -> None:
        check_rate(limit, window, unit, settle)
        self.limit = limit
        self.unit = unit
        self.settle = float(settle)
        self.window = float(window)
        # Grants reach the server a moment later: count each a little longer than the window.
        self._span = window + min(1.0, 0.05 * window)
        self._sent: deque[tuple[float, int]] = deque()  # (granted at, cost)
        self._in_window = 0
        self._paused_until = -math.inf
        self._owner: dict[int, str] = {}  # partition -> token of its current attempt
        self._open: dict[int, dict[int, float]] = {}  # partition -> grant id -> granted at
        self._quiet: dict[int, float] = {}  # partition -> list its group no earlier than this
        self._next_grant = 1
        self.stats = {
            "attempts": 0,
            "requests": 0,
            "runs": 0,
            "waits": 0,
            "pauses": 0,
            "superseded": 0,
        }

    def begin(self, partition: int, token: str, now: float) -> float:
        """A new attempt of ``partition`` takes it over; seconds it must wait to list it."""
        stale = self._open.pop(partition, {})
        if stale:
            quiet = max(stale.values()) + self.settle
            self._quiet[partition] = max(self._quiet.get(partition, -math.inf), quiet)
        self._owner[partition] = token
        self.stats["attempts"] += 1
        return max(0.0, self._quiet.get(partition, -math.inf) - now)

    def acquire(self, partition: int, token: str, runs: int, now: float) -> Grant:
        """One create request of ``runs`` runs: granted now, wait, or superseded."""
        if self._owner.get(partition) != token:
            self.stats["superseded"] += 1
            return ("superseded", 0.0, 0)
        if now < self._paused_until:
            self.stats["waits"] += 1
            return ("wait", self._paused_until - now + _EPSILON, 0)
        cost = min(max(runs, 1), self.limit) if self.unit == "runs" else 1
        sent = self._sent
        while sent and sent[0][0] <= now - self._span:
            self._in_window -= sent.popleft()[1]
        if self._in_window + cost > self.limit:
            freed = 0
            for at, spent in sent:  # the oldest grants leave the window first
                freed += spent
                if self._in_window - freed + cost <= self.limit:
                    self.stats["waits"] += 1
                    return ("wait", max(0.0, at + self._span - now) + _EPSILON, 0)
        sent.append((now, cost))
        self._in_window += cost
        grant = self._next_grant
        self._next_grant += 1
        self._open.setdefault(partition, {})[grant] = now
        self.stats["requests"] += 1
        self.stats["runs"] += max(runs, 1)
        return ("granted", 0.0, grant)

    def release(self, partition: int, token: str, grants: list[int]) -> None:
        """The requests of these grants were answered: a later attempt need not wait for them."""
        if self._owner.get(partition) != token:
            return  # already folded into the partition's quiet time by a newer attempt
        open_grants = self._open.get(partition)
        if open_grants is not None:
            for grant in grants:
                open_grants.pop(grant, None)

    def pause(self, seconds: float, now: float) -> None:
        """The server answered 429: hold every grant for ``seconds``."""
        self.stats["pauses"] += 1
        self._paused_until = max(self._paused_until, now + max(0.0, seconds))


class CoordinatorLink(Protocol):
    """How a task reaches its job's coordinator (the Dask actor, the Spark driver)."""

    async def begin(self, partition: int, token: str) -> float: ...

    async def acquire(self, partition: int, token: str, runs: int) -> Grant: ...

    async def release(self, partition: int, token: str, grants: list[int]) -> None: ...

    async def pause(self, seconds: float) -> None: ...


@dataclasses.dataclass
class _Request:
    runs: int
    grants: list[int] = dataclasses.field(default_factory=list)


_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "parallel_async_cluster_request", default=None
)


class counting:  # noqa: N801 - used like a function: ``with counting(n) as grants``
    """Within this block, this task's create requests carry ``runs`` runs each; the grants
    they used are collected in the list it gives."""

    def __init__(self, runs: int) -> None:
        self._request = _Request(runs)
        self._token: contextvars.Token[_Request | None] | None = None

    def __enter__(self) -> list[int]:
        self._token = _REQUEST.set(self._request)
        return self._request.grants

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None  # noqa: S101
        _REQUEST.reset(self._token)


class SharedCreateLimiter(CreateLimiter):
    """The client's create limiter, answered by the job's coordinator: ``acquire(deadline)``
    before each create request waits for a grant, ``pause`` on a 429 pauses the whole job."""

    def __init__(self, link: CoordinatorLink, partition: int, token: str) -> None:
        super().__init__(None)
        self._link = link
        self._partition = partition
        self._token = token
        self._pauses: set[asyncio.Task[None]] = set()

    async def acquire(self, deadline: float | None = None) -> None:
        """Wait for the coordinator's grant of one create request."""
        request = _REQUEST.get()
        runs = request.runs if request is not None else 1
        while True:
            state, wait, grant = await self._link.acquire(self._partition, self._token, runs)
            if state == "granted":
                if request is not None:
                    request.grants.append(grant)
                return
            if state == "superseded":
                raise ClusterError(
                    f"partition {self._partition}: a newer attempt of this task took over "
                    "(the engine re-ran it); this attempt stops creating runs"
                )
            if deadline is not None and time.monotonic() + wait > deadline:
                raise RunTimeoutError(run_id="", last_status=None, timeout=None)
            await anyio.sleep(wait)

    def pause(self, seconds: float) -> None:
        """A 429: tell the coordinator, which holds every task's creates (sent in the
        background: the interface is synchronous)."""
        task = asyncio.get_running_loop().create_task(self._pause(seconds))
        self._pauses.add(task)
        task.add_done_callback(self._pauses.discard)

    async def _pause(self, seconds: float) -> None:
        try:
            await self._link.pause(seconds)
        except Exception as exc:  # the retry still waits out its Retry-After
            log.warning("could not pause the job's creates after a 429: %s", exc)

    async def aclose(self) -> None:
        """Wait for the pauses still being sent."""
        while self._pauses:
            await asyncio.gather(*self._pauses)

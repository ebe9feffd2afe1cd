"""``FakeParallel``: configuration, state and controls of one emulated Parallel account."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from types import MappingProxyType
from typing import Any

from aiohttp import web

from ._app import build_app
from ._faults import FaultInjector
from ._groups import GroupRecord, GroupStore
from ._ratelimit import SlidingWindow
from ._state import DEFAULT_ERROR_MESSAGE, PlanFunction, RunRecord, RunStore
from ._stats import Stats
from ._webhooks import DEFAULT_WEBHOOK_SECRET, WebhookSender

__all__ = ["FakeParallel"]


class FakeParallel:
    """An in-process emulation of Parallel's Task API (task-run endpoints).

    Serve it with ``FakeServer`` (real TCP) or mount ``make_app()`` in any aiohttp
    runner. All methods must be called from the event loop serving it.

    Args:
        api_key: The accepted ``x-api-key``; ``None`` accepts any key (one must be sent).
        duration: Default seconds from creation to completion. Runs go ``queued`` ->
            ``running`` on the next loop iteration and reach their final status after
            ``duration``.
        processor_durations: Per-processor overrides of ``duration``.
        plan: Called with each decoded create body; may return a ``RunPlan`` (duration,
            outcome, error message, content) for that run, or ``None`` for defaults.
        manual: Runs stay active until ``complete``/``fail``/``cancel`` (only an
            explicit ``RunPlan.duration`` still schedules a run).
        max_long_poll: Cap, in seconds, on how long ``/result`` holds a request, whatever
            its ``timeout``; small values make 408s come fast in tests.
        create_rate_limit: ``(max_creates, window_seconds)``: a sliding window over create
            requests; over it the fake answers 429 with ``Retry-After``.
        seed: Seed of the RNG behind fault probabilities.
        stream_lifetime: Seconds after which a group ``/events`` stream ends even if
            the group is still active (the API documents one hour).
        run_stream_lifetime: Seconds after which a run ``/events`` stream is closed
            mid-run (the API documents 570 s); clients must reconnect.
        webhook_secret: The secret (or secrets) webhooks are signed with: ``whsec_`` +
            base64, or a raw string used as is.
        webhook_retry_delays: Seconds between delivery attempts after a non-2xx answer;
            default the API's schedule (5 s doubling, up to 48 h). Tests pass small ones.
        webhook_timeout: Seconds one delivery attempt may take.

    ``duration``, ``processor_durations``, ``plan``, ``manual``, ``api_key`` and
    ``max_long_poll`` are also attributes: changing one affects later requests.
    ``request_log``, when set, is called once per request handled with a dict: ``time``,
    ``endpoint``, ``method``, ``path``, ``status`` (an int, ``"dropped"`` or
    ``"cancelled"``) and ``runs_created`` (runs that request created while it was handled).

    Attributes:
        faults: Fault scripts and probabilities (``FaultInjector``); ``"webhook"`` faults
            lose, repeat or delay webhook deliveries.
        webhooks: The webhook sender (``WebhookSender``): deliveries, hold/release, secret.
        stats: Counters for assertions (``Stats``).
        store: The run store (``RunStore``); ``runs`` is its read-only view.
        group_store: The task groups (``GroupStore``); ``groups`` is its read-only view.
    """

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        duration: float = 0.0,
        processor_durations: Mapping[str, float] | None = None,
        plan: PlanFunction | None = None,
        manual: bool = False,
        max_long_poll: float | None = None,
        create_rate_limit: tuple[int, float] | None = None,
        seed: int = 0,
        stream_lifetime: float = 3600.0,
        run_stream_lifetime: float = 570.0,
        webhook_secret: str | Sequence[str] = DEFAULT_WEBHOOK_SECRET,
        webhook_retry_delays: Sequence[float] | None = None,
        webhook_timeout: float = 10.0,
    ) -> None:
        if math.isnan(duration) or duration < 0:
            raise ValueError(f"duration must be >= 0, not {duration!r}")
        if max_long_poll is not None and not max_long_poll >= 0:
            raise ValueError(f"max_long_poll must be >= 0 or None, not {max_long_poll!r}")
        for name, value in (
            ("stream_lifetime", stream_lifetime),
            ("run_stream_lifetime", run_stream_lifetime),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, not {value!r}")
        self.stream_lifetime = stream_lifetime
        self.run_stream_lifetime = run_stream_lifetime
        self.group_store = GroupStore()
        self.api_key = api_key
        self.max_long_poll = max_long_poll
        self.stats = Stats()
        self.faults = FaultInjector(seed)
        self.store = RunStore(
            duration=duration,
            processor_durations=processor_durations,
            manual=manual,
            plan=plan,
        )
        self.limiter = SlidingWindow(*create_rate_limit) if create_rate_limit else None
        self.webhooks = WebhookSender(
            self.faults,
            secret=webhook_secret,
            retry_delays=webhook_retry_delays,
            timeout=webhook_timeout,
        )
        self.store.on_finish = self.webhooks.run_finished
        self.request_log: Callable[[dict[str, Any]], None] | None = None

    @property
    def duration(self) -> float:
        """Default run duration in seconds, for runs created from now on."""
        return self.store.duration

    @duration.setter
    def duration(self, value: float) -> None:
        self.store.duration = value

    @property
    def processor_durations(self) -> dict[str, float]:
        """Per-processor durations (a live dict: edit it in place or assign a new one)."""
        return self.store.processor_durations

    @processor_durations.setter
    def processor_durations(self, value: Mapping[str, float]) -> None:
        self.store.processor_durations = dict(value)

    @property
    def plan(self) -> PlanFunction | None:
        """The per-run plan callback, for runs created from now on."""
        return self.store.plan

    @plan.setter
    def plan(self, value: PlanFunction | None) -> None:
        self.store.plan = value

    @property
    def manual(self) -> bool:
        """Whether runs created from now on wait for ``complete``/``fail``/``cancel``."""
        return self.store.manual

    @manual.setter
    def manual(self, value: bool) -> None:
        self.store.manual = value

    @property
    def runs(self) -> Mapping[str, RunRecord]:
        """Read-only mapping of run id to ``RunRecord``, in creation order."""
        return MappingProxyType(self.store.runs)

    @property
    def groups(self) -> Mapping[str, GroupRecord]:
        """Read-only mapping of task group id to ``GroupRecord``, in creation order."""
        return MappingProxyType(self.group_store.groups)

    def complete(self, run_id: str, content: object | None = None) -> None:
        """Complete an active run now; ``content`` (str or mapping) replaces the output.

        Raises ``KeyError`` for an unknown run and ``ValueError`` for a finished one.
        """
        self.store.complete(run_id, content)

    def fail(self, run_id: str, message: str = DEFAULT_ERROR_MESSAGE) -> None:
        """Fail an active run now, with ``error.message`` = ``message``."""
        self.store.fail(run_id, message)

    def cancel(self, run_id: str) -> None:
        """Cancel an active run now (status ``cancelled``)."""
        self.store.cancel(run_id)

    def require_action(self, run_id: str) -> None:
        """Put an active run in ``action_required`` (``/result`` keeps holding it)."""
        self.store.require_action(run_id)

    def make_app(self) -> web.Application:
        """Build a new aiohttp application serving this fake (one per runner)."""
        return build_app(self)

    @cached_property
    def app(self) -> web.Application:
        """An aiohttp application serving this fake, built on first access."""
        return self.make_app()

    def close(self) -> None:
        """Cancel pending lifecycle timers, held group adds and webhook deliveries (teardown)."""
        self.store.close()
        self.group_store.close()
        self.webhooks.cancel_pending()

"""The fan-out methods of `AsyncParallel`: ``as_completed``, ``gather`` and ``map``.

A mixin, so the client module keeps configuration, lifecycle and the request path; these only
check their arguments and hand them to the strategies (`_fanout`, `_group_tracking`).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast, overload

from . import _fanout, _group_tracking
from ._engine import DEFAULT_POLL_INTERVAL, FanoutOptions
from ._errors import InvalidArgumentError
from ._models import Metadata, SourcePolicy, TaskAdvancedSettings, TaskSpec, Webhook
from ._outcomes import Outcome, Outcomes
from ._progress import ProgressCallback
from ._typed import ParsedTaskRunResult
from ._webhooks import webhook_betas

if TYPE_CHECKING:
    from ._client import AsyncParallel

__all__ = ["FanoutMethods"]

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT")


class FanoutMethods:
    """``as_completed``, ``gather`` and ``map`` (mixed into `AsyncParallel`)."""

    __slots__ = ()

    def as_completed(
        self,
        run_ids: Iterable[str],
        *,
        group: str | None = None,
        timeout: float | None = None,
        run_timeout: float | None = None,
        poll_interval: int = DEFAULT_POLL_INTERVAL,
        fail_fast: bool = False,
        progress: ProgressCallback | None = None,
        betas: Sequence[str] | None = None,
        order: Literal["completed", "input"] = "completed",
    ) -> AbstractAsyncContextManager[Outcomes[None, None]]:
        """Await existing runs; outcomes arrive as runs finish.

            async with client.as_completed(run_ids, timeout=3600) as outcomes:
                async for o in outcomes:
                    print(o.run_id, o.result if o.ok else o.error)

        Args:
            run_ids: the runs (checked before any request).
            group: the task group these runs belong to: completions are then learnt from the
                group's event stream (one connection) instead of a long-poll per run.
            timeout: one deadline for the whole fan-out, seconds; runs still active then end
                as `RunTimeoutError` outcomes.
            run_timeout: a deadline per run, seconds from when it starts being tracked.
            poll_interval: server long-poll (whole seconds, default 3) while many runs wait
                for a slot; polls lengthen as that backlog shrinks (see the fan-out guide).
            fail_fast: raise the first run error out of the ``async with`` block (and cancel
                the rest) instead of yielding it as an outcome.
            progress: called with a `Progress` snapshot after every change.
            betas: ``parallel-beta`` values for the requests.
            order: ``"completed"`` (as runs finish) or ``"input"`` (the order of ``run_ids``).

        Leaving the block early cancels every in-flight request and releases its connection.
        """
        options = FanoutOptions(
            timeout=timeout,
            run_timeout=run_timeout,
            poll_interval=poll_interval,
            fail_fast=fail_fast,
            progress=progress,
            betas=betas,
            order=order,
        )
        if group is not None:
            return _group_tracking.as_completed_group(self._as_client(), run_ids, group, options)
        return _fanout.as_completed(self._as_client(), run_ids, options)

    async def gather(
        self,
        run_ids: Iterable[str],
        *,
        timeout: float | None = None,
        run_timeout: float | None = None,
        poll_interval: int = DEFAULT_POLL_INTERVAL,
        fail_fast: bool = False,
        progress: ProgressCallback | None = None,
        betas: Sequence[str] | None = None,
    ) -> list[Outcome[None, None]]:
        """Await existing runs; return their outcomes in the order of ``run_ids``.

        Same arguments as `as_completed`.
        """
        options = FanoutOptions(
            timeout=timeout,
            run_timeout=run_timeout,
            poll_interval=poll_interval,
            fail_fast=fail_fast,
            progress=progress,
            betas=betas,
        )
        return await _fanout.gather(self._as_client(), run_ids, options)

    @overload
    def map(
        self,
        inputs: Iterable[InputT] | AsyncIterable[InputT],
        *,
        processor: str,
        task_spec: TaskSpec | Mapping[str, Any] | str | None = None,
        metadata: Metadata | Callable[[InputT], Metadata] | None = None,
        source_policy: SourcePolicy | Mapping[str, Any] | None = None,
        advanced_settings: TaskAdvancedSettings | Mapping[str, Any] | None = None,
        enable_events: bool | None = None,
        webhook: Webhook | Mapping[str, Any] | None = None,
        output: type[OutputT],
        input_type: Any = None,
        strategy: Literal["group", "poll"] = "group",
        timeout: float | None = None,
        run_timeout: float | None = None,
        poll_interval: int = DEFAULT_POLL_INTERVAL,
        fail_fast: bool = False,
        progress: ProgressCallback | None = None,
        betas: Sequence[str] | None = None,
        order: Literal["completed", "input"] = "completed",
    ) -> AbstractAsyncContextManager[Outcomes[InputT, ParsedTaskRunResult[OutputT]]]: ...

    @overload
    def map(
        self,
        inputs: Iterable[InputT] | AsyncIterable[InputT],
        *,
        processor: str,
        task_spec: TaskSpec | Mapping[str, Any] | str | None = None,
        metadata: Metadata | Callable[[InputT], Metadata] | None = None,
        source_policy: SourcePolicy | Mapping[str, Any] | None = None,
        advanced_settings: TaskAdvancedSettings | Mapping[str, Any] | None = None,
        enable_events: bool | None = None,
        webhook: Webhook | Mapping[str, Any] | None = None,
        output: str | Mapping[str, Any] | None = None,
        input_type: Any = None,
        strategy: Literal["group", "poll"] = "group",
        timeout: float | None = None,
        run_timeout: float | None = None,
        poll_interval: int = DEFAULT_POLL_INTERVAL,
        fail_fast: bool = False,
        progress: ProgressCallback | None = None,
        betas: Sequence[str] | None = None,
        order: Literal["completed", "input"] = "completed",
    ) -> AbstractAsyncContextManager[Outcomes[InputT, None]]: ...

    def map(
        self,
        inputs: Iterable[InputT] | AsyncIterable[InputT],
        *,
        processor: str,
        task_spec: TaskSpec | Mapping[str, Any] | str | None = None,
        metadata: Metadata | Callable[[InputT], Metadata] | None = None,
        source_policy: SourcePolicy | Mapping[str, Any] | None = None,
        advanced_settings: TaskAdvancedSettings | Mapping[str, Any] | None = None,
        enable_events: bool | None = None,
        webhook: Webhook | Mapping[str, Any] | None = None,
        output: Any = None,
        input_type: Any = None,
        strategy: Literal["group", "poll"] = "group",
        timeout: float | None = None,
        run_timeout: float | None = None,
        poll_interval: int = DEFAULT_POLL_INTERVAL,
        fail_fast: bool = False,
        progress: ProgressCallback | None = None,
        betas: Sequence[str] | None = None,
        order: Literal["completed", "input"] = "completed",
    ) -> AbstractAsyncContextManager[Outcomes[InputT, Any]]:
        """Create one run per input and await them all; outcomes arrive as runs finish.

            async with client.map(companies, processor="base", task_spec=spec) as outcomes:
                async for o in outcomes:
                    print(o.index, o.input, o.result.output.content if o.ok else o.error)

        Each input is a run's ``input`` (a string or a dict), or a whole `RunInput`.
        ``output`` (a msgspec Struct, dataclass or TypedDict type) replaces ``task_spec`` and
        fills each outcome's ``parsed`` with a ``ParsedTaskRunResult`` (the typed value is
        ``o.parsed.output.parsed``); ``input_type`` sets the input schema.
        The other create arguments apply to every run and are checked before any request; a
        bad input becomes an `InvalidArgumentError` outcome for that input alone.
        Creates go through the client's rate limiter; a create is never repeated when it may
        have reached the server, so no input gets two runs. ``inputs`` may be lazy (any
        iterable or async iterable): it is read as creates proceed.

        ``strategy`` chooses how completions are learnt: ``"group"`` (default) creates the runs
        in a task group, in requests of up to 1,000, and follows the group's event stream on one
        connection, fetching each finished run's result; ``"poll"`` creates runs one by one and
        long-polls each run's ``/result`` with rotation. The fan-out arguments are those of
        `as_completed`; ``timeout`` also bounds the creates.

        ``metadata`` is a dict for every run, or a function of the input returning each run's
        own (a failing function makes that input's outcome an `InvalidArgumentError`).
        ``order="input"`` yields outcomes in input order instead of as runs finish (finished
        outcomes wait for every earlier one); ``outcomes.group_id`` is the task group the
        runs were created in (group strategy).
        """
        if isinstance(inputs, str | bytes | Mapping):
            raise InvalidArgumentError("inputs must be an iterable of inputs, not a single input")
        if strategy not in ("group", "poll"):
            raise InvalidArgumentError(f"strategy must be 'group' or 'poll', got {strategy!r}")
        create_kwargs = {
            "processor": processor,
            "task_spec": task_spec,
            "metadata": metadata,
            "source_policy": source_policy,
            "advanced_settings": advanced_settings,
            "enable_events": enable_events,
            "webhook": webhook,
            "output": output,
            "input_type": input_type,
        }
        run = _group_tracking.map_group if strategy == "group" else _fanout.map_inputs
        options = FanoutOptions(
            timeout=timeout,
            run_timeout=run_timeout,
            poll_interval=poll_interval,
            fail_fast=fail_fast,
            progress=progress,
            betas=webhook_betas(webhook, betas),  # a webhook needs its beta on the creates
            order=order,
        )
        return run(self._as_client(), inputs, create_kwargs, options)

    def _as_client(self) -> AsyncParallel:
        return cast("AsyncParallel", self)  # only ever mixed into AsyncParallel

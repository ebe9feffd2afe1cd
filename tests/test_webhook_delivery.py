"""The fake server delivers signed webhooks to real receivers (aiohttp.web) over 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import pytest
import standardwebhooks
from aiohttp import web
from local_server import refused_port, serve_app

from parallel_async import AsyncParallel, TaskRunStatusEvent
from parallel_async.testing import FakeParallel, FakeServer, Fault
from parallel_async.testing._webhooks import API_RETRY_DELAYS
from parallel_async.webhooks import WebhookEvent

SECRET = "test-webhook-secret"
FAST = (0.01, 0.02, 0.04)
WHSEC = "whsec_" + base64.b64encode(b"fake-rotated-secret-0123456789ab").decode()

pytestmark = pytest.mark.anyio


@dataclass
class Receiver:
    """A real aiohttp.web app receiving deliveries with ``client.webhooks.aiohttp_handler()``."""

    url: str
    client: AsyncParallel
    events: list[WebhookEvent] = field(default_factory=list)


@asynccontextmanager
async def receiving(
    fake: FakeParallel, secret: str | list[str] = SECRET, refuse_first: int = 0
) -> AsyncIterator[Receiver]:
    async with FakeServer(fake) as server:
        client = AsyncParallel(api_key="test-key", base_url=server.url, webhook_secret=secret)
        async with client:
            handler = client.webhooks.aiohttp_handler()
            refused = [0]

            async def flaky(request: web.Request) -> web.StreamResponse:
                if refused[0] < refuse_first:  # an outage of the receiving app
                    refused[0] += 1
                    return web.Response(status=503)
                return await handler(request)

            app = web.Application()
            app.router.add_post("/hooks/parallel", flaky)
            async with serve_app(app) as base:
                receiver = Receiver(url=f"{base}/hooks/parallel", client=client)
                client.webhooks.on_event(receiver.events.append)
                yield receiver


def _fake(**kwargs: Any) -> FakeParallel:
    return FakeParallel(duration=0.0, max_long_poll=0.05, webhook_retry_delays=FAST, **kwargs)


async def test_a_finished_run_is_delivered_once_signed_and_typed() -> None:
    fake = _fake()
    async with receiving(fake) as rx:
        run = await rx.client.task_run.create(
            input="Acme", processor="base", webhook={"url": rx.url}, metadata={"k": "v"}
        )
        result = await rx.client.task_run.result(run.run_id, timeout=5)
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    assert [type(e) for e in rx.events] == [TaskRunStatusEvent]
    event = rx.events[0]
    assert isinstance(event, TaskRunStatusEvent)
    assert event.data.run_id == run.run_id
    assert event.data.status == "completed"
    assert event.data.is_active is False
    assert event.data.metadata == {"k": "v"}
    assert event.data == result.run
    (delivery,) = fake.webhooks.deliveries
    assert (delivery.state, delivery.attempts, delivery.fault) == ("delivered", [204], None)
    assert delivery.webhook_id == event.webhook_id
    assert delivery.webhook_id.startswith("whevent_")
    assert fake.webhooks.sent == 1
    assert fake.webhooks.count("delivered") == 1


async def test_failed_and_cancelled_runs_are_delivered_and_runs_without_webhook_are_not() -> None:
    fake = _fake(manual=True)
    async with receiving(fake) as rx:
        hook = {"url": rx.url, "event_types": ["task_run.status"]}
        failed = await rx.client.task_run.create(input="a", processor="base", webhook=hook)
        cancelled = await rx.client.task_run.create(input="b", processor="base", webhook=hook)
        plain = await rx.client.task_run.create(input="c", processor="base")
        fake.fail(failed.run_id, "no sources")
        fake.cancel(cancelled.run_id)
        fake.complete(plain.run_id)
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    by_run = {e.data.run_id: e.data for e in rx.events if isinstance(e, TaskRunStatusEvent)}
    assert set(by_run) == {failed.run_id, cancelled.run_id}
    failed_run = by_run[failed.run_id]
    assert failed_run.status == "failed"
    assert failed_run.error is not None
    assert failed_run.error.message == "no sources"
    assert by_run[cancelled.run_id].status == "cancelled"


async def test_a_non_2xx_answer_is_retried_with_the_same_id_and_delivered_once() -> None:
    fake = _fake()
    async with receiving(fake, refuse_first=2) as rx:
        await rx.client.task_run.create(input="a", processor="base", webhook={"url": rx.url})
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    (delivery,) = fake.webhooks.deliveries
    assert delivery.attempts == [503, 503, 204]
    assert delivery.state == "delivered"
    assert len(rx.events) == 1


async def test_retries_stop_after_the_schedule_and_the_delivery_fails() -> None:
    fake = _fake()
    async with receiving(fake, secret="not-the-fakes-secret") as rx:
        await rx.client.task_run.create(input="a", processor="base", webhook={"url": rx.url})
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    (delivery,) = fake.webhooks.deliveries
    assert delivery.attempts == [400] * (len(FAST) + 1)
    assert delivery.state == "failed"
    assert rx.events == []


async def test_an_unreachable_url_counts_as_no_answer_and_is_retried() -> None:
    fake = _fake()
    with refused_port() as port:  # nothing listens: connections are refused
        async with receiving(fake) as rx:
            for url in (f"http://127.0.0.1:{port}/hook", "not a url"):
                webhook = {"url": url}
                await rx.client.task_run.create(input="a", processor="base", webhook=webhook)
            await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    for delivery in fake.webhooks.deliveries:
        assert delivery.state == "failed"
        assert len(delivery.attempts) == len(FAST) + 1
        assert all(isinstance(a, str) for a in delivery.attempts)


async def test_faults_lose_repeat_and_delay_deliveries() -> None:
    fake = _fake(manual=True)
    fake.faults.script("webhook", [Fault.drop(), Fault.duplicate(), Fault.slow(0.2), Fault.ok()])
    async with receiving(fake) as rx:
        runs = [
            await rx.client.task_run.create(input=str(i), processor="base", webhook={"url": rx.url})
            for i in range(4)
        ]
        for run in runs:
            fake.complete(run.run_id)
        lost, twice, late, plain = fake.webhooks.deliveries
        assert (lost.state, lost.attempts) == ("lost", [])
        assert late.state == "pending"  # sent 0.2 s later
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    assert [d.fault for d in fake.webhooks.deliveries] == ["drop", "duplicate", "slow", None]
    assert twice.attempts == [204, 200]  # the repeat is recognised by its webhook-id
    assert late.attempts == plain.attempts == [204]
    assert fake.webhooks.count("lost") == 1
    assert sorted(e.data.run_id for e in rx.events) == sorted(r.run_id for r in runs[1:])


async def test_webhook_faults_are_not_drawn_from_the_wildcard() -> None:
    fake = _fake()
    fake.faults.script("*", [Fault.ok()])
    fake.faults.script("webhook", [Fault.drop()])
    async with receiving(fake) as rx:
        await rx.client.task_run.create(input="a", processor="base", webhook={"url": rx.url})
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    assert fake.faults.remaining("*") == 0  # the create took it
    assert fake.webhooks.count("lost") == 1


async def test_probabilities_lose_a_share_of_deliveries() -> None:
    fake = _fake(seed=7)
    fake.faults.probabilities("webhook", {Fault.drop(): 0.5})
    async with receiving(fake) as rx:
        for i in range(40):
            await rx.client.task_run.create(input=str(i), processor="base", webhook={"url": rx.url})
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    lost = fake.webhooks.count("lost")
    assert 5 < lost < 35
    assert len(rx.events) == 40 - lost


async def test_hold_and_release_make_deliveries_late_at_will() -> None:
    fake = _fake(manual=True)
    async with receiving(fake) as rx:
        run = await rx.client.task_run.create(input="a", processor="base", webhook={"url": rx.url})
        fake.webhooks.hold()
        fake.complete(run.run_id)
        with pytest.raises(TimeoutError):
            await fake.webhooks.wait_idle(timeout=0.05)
        assert fake.webhooks.pending == 1
        assert fake.webhooks.sent == 0
        assert rx.events == []
        fake.webhooks.release()
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    assert [e.data.run_id for e in rx.events] == [run.run_id]


async def test_stale_timestamps_are_refused_by_the_receiver() -> None:
    fake = _fake()
    fake.webhooks.timestamp_offset = -600
    async with receiving(fake) as rx:
        await rx.client.task_run.create(input="a", processor="base", webhook={"url": rx.url})
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    assert fake.webhooks.deliveries[0].attempts == [400] * (len(FAST) + 1)
    assert rx.events == []


async def test_rotated_whsec_secrets_sign_every_delivery_and_agree_with_standardwebhooks() -> None:
    fake = _fake(webhook_secret=["old-raw-secret", WHSEC])
    async with receiving(fake, secret=WHSEC) as rx:
        run = await rx.client.task_run.create(input="a", processor="base", webhook={"url": rx.url})
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    assert [e.data.run_id for e in rx.events] == [run.run_id]
    delivery = fake.webhooks.deliveries[0]
    headers = fake.webhooks.headers(delivery)
    assert len(headers["webhook-signature"].split()) == 2
    assert standardwebhooks.Webhook(WHSEC).verify(delivery.body, headers)["type"] == (
        "task_run.status"
    )


async def test_group_runs_with_a_webhook_are_delivered_too() -> None:
    fake = _fake()
    async with receiving(fake) as rx:
        group = await rx.client.task_group.create()
        added = await rx.client.task_group.add_runs(
            group.taskgroup_id,
            inputs=[
                {"input": "a", "processor": "base", "webhook": {"url": rx.url}},
                {"input": "b", "processor": "base"},
            ],
        )
        await rx.client.gather(added.run_ids, timeout=5)
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    assert [e.data.run_id for e in rx.events] == [added.run_ids[0]]
    event = rx.events[0]
    assert isinstance(event, TaskRunStatusEvent)
    assert event.data.taskgroup_id == group.taskgroup_id


def test_fake_configuration_is_checked() -> None:
    bad: list[dict[str, Any]] = [
        {"webhook_secret": ""},
        {"webhook_secret": []},
        {"webhook_secret": "whsec_%%%"},
        {"webhook_retry_delays": [-1]},
        {"webhook_timeout": 0},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):  # noqa: PT011 - the fake's configuration errors
            FakeParallel(**kwargs)
    assert API_RETRY_DELAYS[:3] == (5.0, 10.0, 20.0)
    assert sum(API_RETRY_DELAYS) <= 48 * 3600
    assert sum(API_RETRY_DELAYS) + API_RETRY_DELAYS[-1] * 2 > 48 * 3600


@pytest.mark.anyio
@pytest.mark.parametrize("strategy", ["group", "poll"])
async def test_map_with_a_webhook_sends_the_webhook_beta_on_its_creates(
    strategy: Literal["group", "poll"],
) -> None:
    fake = FakeParallel(duration=0.0)
    async with FakeServer(fake) as server:
        async with AsyncParallel(
            api_key="test-key", base_url=server.url, create_rate_limit=None
        ) as client:
            async with client.map(
                ["a", "b"],
                processor="lite",
                webhook={"url": "http://127.0.0.1:9/hook"},
                strategy=strategy,
            ) as outcomes:
                assert len([o async for o in outcomes]) == 2
    create = "group_add_runs" if strategy == "group" else "create"
    assert fake.stats.betas[create, "webhook-2025-08-12"] == fake.stats.requests[create] > 0


async def test_result_waiters_wake_on_webhooks_and_lost_ones_are_polled_after_the_safety_net() -> (
    None
):
    # 40 runs created with a webhook on a client that receives them: each waiter is woken by
    # its webhook and fetches the result once; 10% of the webhooks are lost, and those
    # waiters still get their results, by polling once `poll_after` has passed.
    n = 40
    fake = FakeParallel(duration=0.2, max_long_poll=0.05, webhook_retry_delays=FAST)
    lost = {4, 14, 24, 34}
    fake.faults.script("webhook", [Fault.drop() if i in lost else Fault.ok() for i in range(n)])
    async with receiving(fake) as rx:
        rx.client.webhooks.poll_after = 1.0
        runs = [
            await rx.client.task_run.create(
                input=f"q{i}", processor="base", webhook={"url": rx.url}
            )
            for i in range(n)
        ]
        results = await asyncio.gather(
            *(rx.client.task_run.result(r.run_id, timeout=30) for r in runs)
        )
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    assert [r.run.run_id for r in results] == [r.run_id for r in runs]
    states = {d.run_id: d.state for d in fake.webhooks.deliveries}
    assert sorted(states.values()).count("lost") == len(lost)
    per_run = fake.stats.result_requests_by_run
    woken = [run_id for run_id, state in states.items() if state == "delivered"]
    assert len(woken) == n - len(lost)
    assert all(per_run[run_id] == 1 for run_id in woken), [per_run[r] for r in woken]


async def test_a_late_webhook_is_checked_for_not_polled_and_an_ended_run_is_fetched_at_once() -> (
    None
):
    # `poll_after` passes while the run is still going: its webhook is not due yet, so its
    # waiters do not poll; the run's status is checked every `poll_after`. The run ends and
    # its webhook is lost: the next check finds it ended and fetches the result, once.
    fake = FakeParallel(manual=True, webhook_retry_delays=FAST)
    fake.faults.script("webhook", [Fault.drop()])
    async with receiving(fake) as rx:
        client = rx.client
        client.webhooks.poll_after = 0.05
        run = await client.task_run.create(input="x", processor="lite", webhook={"url": rx.url})
        got: list[str] = []

        async def waiter() -> None:
            got.append((await client.task_run.result(run.run_id, timeout=30)).run.run_id)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(waiter)
            with anyio.fail_after(10):
                while fake.stats.requests["retrieve"] < 3:  # checked, again and again...
                    await anyio.sleep(0.002)
            assert fake.stats.requests["result"] == 0  # ...never polled
            fake.complete(run.run_id)  # and its webhook is lost
        await fake.webhooks.wait_idle(timeout=5)
    fake.close()
    assert got == [run.run_id] * 3
    assert fake.stats.requests["result"] == 1
    assert [d.state for d in fake.webhooks.deliveries] == ["lost"]
    assert rx.events == []

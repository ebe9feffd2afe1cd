"""A fake Parallel Task API server for tests and benchmarks.

``FakeParallel`` emulates the Task API (task runs with the ``/result`` long-poll and
their event stream, task groups and their SSE streams) with a controllable run
lifecycle, fault injection, a creation rate limit and counters; ``FakeServer``
serves it over real TCP:

    from parallel_async.testing import FakeParallel, FakeServer, Fault

    fake = FakeParallel(api_key="test-key", duration=0.1, max_long_poll=0.05)
    fake.faults.script("create", [Fault.status(503), Fault.ok()])
    async with FakeServer(fake) as server:
        ...  # point a client at server.url

It depends only on aiohttp, msgspec and the standard library, never on the client,
so client and fake cannot share a bug. Pytest users can enable the ``fake_parallel``
and ``fake_server`` fixtures with
``pytest_plugins = ["parallel_async.testing.pytest_plugin"]``.
"""

from .._retry import set_testing
from ._fake import FakeParallel
from ._faults import Fault, FaultInjector
from ._groups import GroupRecord
from ._server import FakeServer, run_fake_server
from ._state import RunPlan, RunRecord
from ._stats import Stats
from ._webhooks import WebhookDelivery, WebhookSender

__all__ = [
    "FakeParallel",
    "FakeServer",
    "Fault",
    "FaultInjector",
    "GroupRecord",
    "RunPlan",
    "RunRecord",
    "Stats",
    "WebhookDelivery",
    "WebhookSender",
    "run_fake_server",
    "set_testing",
]

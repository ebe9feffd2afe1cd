"""Webhooks: verify Parallel's signed deliveries, receive them in web apps, test receivers.

    from parallel_async.webhooks import verify, TaskRunStatusEvent

    event = verify(body, headers, os.environ["PARALLEL_WEBHOOK_SECRET"])
    if isinstance(event, TaskRunStatusEvent):
        print(event.data.run_id, event.data.status)

`verify` raises `WebhookVerificationError` (a `ParallelError`) for every bad delivery and
nothing else. ``client.webhooks`` (a `WebhookResource`) verifies with the client's
``webhook_secret=`` and serves receivers for ``aiohttp.web`` and any ASGI framework. `sign` and
`event_payload` build signed deliveries for your tests. See the webhooks guide.
"""

from ._errors import WebhookVerificationError
from ._webhook_receivers import WebhookASGIApp, WebhookCallback, WebhookResource, WebhookSink
from ._webhook_signing import event_payload, sign
from ._webhooks import (
    DEFAULT_TOLERANCE,
    TASK_RUN_STATUS,
    WEBHOOK_BETA,
    Secret,
    TaskRunStatusEvent,
    UnknownWebhookEvent,
    WebhookDeduplicator,
    WebhookEvent,
    verify,
)

__all__ = [
    "DEFAULT_TOLERANCE",
    "TASK_RUN_STATUS",
    "WEBHOOK_BETA",
    "Secret",
    "TaskRunStatusEvent",
    "UnknownWebhookEvent",
    "WebhookASGIApp",
    "WebhookCallback",
    "WebhookDeduplicator",
    "WebhookEvent",
    "WebhookResource",
    "WebhookSink",
    "WebhookVerificationError",
    "event_payload",
    "sign",
    "verify",
]

"""Every tunable default of the library, in one place.

Modules import their defaults from here (under the same names), so "where do I change how long
X waits" has one answer. API limits that are facts about the service, not choices of ours
(metadata sizes, schema limits, 1,000 runs per add) stay beside the code that checks them.
"""

from __future__ import annotations

# --- the client -----------------------------------------------------------------------------
BASE_URL = "https://api.parallel.ai"
MAX_IN_FLIGHT = 100
"""Requests open at once per client (the connection pool is this + 2)."""
CREATE_RATE_LIMIT = 2000
"""Creates per `CREATE_RATE_WINDOW`, client-wide: the API's documented limit."""
CREATE_RATE_WINDOW = 60.0
READ_TIMEOUT = 60.0
"""HTTP read timeout, seconds, of ordinary (not long-poll, not stream) requests."""
CONNECT_TIMEOUT = 10.0

# --- awaiting runs --------------------------------------------------------------------------
POLL_INTERVAL = 1
"""Shortest server wait of the result hub's ``/result`` polls, whole seconds."""
FANOUT_POLL_INTERVAL = 3
"""A fan-out's shortest server wait, whole seconds, while its runs queue for slots: each poll
of a run still going costs a request (a 408), so short waits buy lag with requests. At 3 s,
1,000 runs finishing within 5 s on 256 slots cost about 1.1 requests per run (1.8 at 1 s)
for a p99 lag of about 2.5 s (1.5 s; a loop holding a slot per run: 3 s)."""
PACE = 0.2
"""After a 408, while more runs than slots wait, a run rests this share of its age (time since
its first poll) before its next poll: runs that have gone on long are likely to go on."""
PACE_CAP = 15.0
"""The longest such rest, seconds (it bounds the lag it adds)."""
LONG_POLL = 30
"""Server wait of a poll when every tracked run has a slot of its own."""
LONG_POLL_READ_MARGIN = 10.0
"""The HTTP read timeout of a long-poll sits this far above its server wait."""
API_TIMEOUT = 600
"""``result(api_timeout=)``: the official SDK's server long-poll (our hub caps it at LONG_POLL)."""
RESULT_TIMEOUT = 3600.0
"""``result(timeout=)`` and ``execute(timeout=)``: the whole call's deadline."""
TRANSIENT_ROUNDS = 3
"""Times a run goes back in the queue after a poll failed for good on a transient error."""

# --- fan-out --------------------------------------------------------------------------------
CREATE_WORKERS = 16
"""Concurrent creates of ``map(strategy="poll")`` (bounded by max_in_flight too)."""
BATCH_LINGER = 0.2
"""Seconds a partial batch of a group ``map`` waits for more inputs before it is sent."""
PROGRESS_READ_INTERVAL = 2.0
"""Seconds between reads of a group's status counts while a progress callback is set."""
STREAM_FAILURES_BEFORE_POLLING = 3
"""Failed group-stream connections in a row after which a group ``map`` polls instead."""

# --- the result hub -------------------------------------------------------------------------
HUB_FIRST_POLL = 1
"""A run's first long-poll in the hub, seconds; it doubles each time one holds (slow start)."""
HUB_CHECKS_PER_SLOT = 4.0
"""Status checks per slot per second, at most, while many more runs wait than slots."""
HUB_PATIENCE = 1.0
"""Seconds without a new hub request, work waiting, before a long-poll is cut for it."""
STATUS_REFRESH = 60.0
"""Seconds between status reads of a waited run, for its timeout error's last status."""
WEBHOOK_POLL_AFTER = 30.0
"""Seconds after its create, then between status checks, for a run whose webhook has not come."""

# --- task groups ----------------------------------------------------------------------------
RECONCILE_SETTLE = 60.0
"""Seconds ``add_runs`` waits for the runs of an add whose answer was lost."""
RECONCILE_READ_ATTEMPTS = 8
"""Reads of a group (each under the RetryPolicy) before a lost add is unresolved."""

# --- event streams --------------------------------------------------------------------------
STREAM_READ_TIMEOUT = 300.0
"""Seconds of silence after which a stream connection counts as dead."""
MAX_RECONNECTS = 50
"""Reconnects of one stream call before it gives up."""
MAX_SSE_LINE = 8 * 1024 * 1024
"""Longest line (or event) of an event stream, bytes: longer fails typed."""

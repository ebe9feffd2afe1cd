"""Counters tests assert on: requests, statuses, runs, concurrency, connections."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Stats"]


@dataclass
class Stats:
    """What the fake has seen and sent; ``Counter`` fields read 0 for missing keys.

    Attributes:
        requests: Requests per endpoint name (``"create"``, ``"retrieve"``, ``"result"``,
            ``"input"``), counted on arrival, faulted ones included.
        statuses: Responses sent, by HTTP status. Dropped requests are not responses.
        result_timeouts: ``/result`` requests by the long-poll ``timeout`` they asked for
            (seconds; ``None`` when the query had none).
        runs_created: Runs created (including those whose response was dropped).
        rate_limited: 429 responses sent, from the rate limiter or injected faults.
        dropped: Connections closed instead of answering (``drop``/``drop_after``).
        requests_in_flight: Requests of any endpoint being handled right now (SSE streams
            included): what a client's concurrency bound is checked against.
        max_requests_in_flight: Highest ``requests_in_flight`` seen.
        result_in_flight: ``/result`` requests being held right now.
        max_result_in_flight: Highest ``result_in_flight`` seen.
        open_connections: TCP connections open right now (``FakeServer`` only).
        max_open_connections: Highest ``open_connections`` seen.
        connections_total: TCP connections accepted so far.
        streams_open: SSE streams being sent right now.
        max_streams_open: Highest ``streams_open`` seen.
        streams_total: SSE streams started so far.
        streams_cut: SSE streams closed abruptly by a ``cut_stream`` fault.
        events_sent: SSE events written (a cut, half-sent event is not counted).
        result_requests_by_run: ``/result`` requests per run id that reached the handler
            (injected status/drop faults answer before it and are not counted here).
        result_open_by_run: ``/result`` requests per run id open right now, from reaching the
            handler to its answer (held or not); runs with none are absent.
        max_result_open_by_run: Highest ``result_open_by_run`` seen, per run id.
        betas: Requests per (endpoint name, ``parallel-beta`` header value), counted on
            arrival; requests without the header count under ``""``.
    """

    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    result_timeouts: Counter[int | None] = field(default_factory=Counter)
    runs_created: int = 0
    rate_limited: int = 0
    dropped: int = 0
    requests_in_flight: int = 0
    max_requests_in_flight: int = 0
    result_in_flight: int = 0
    max_result_in_flight: int = 0
    open_connections: int = 0
    max_open_connections: int = 0
    connections_total: int = 0
    streams_open: int = 0
    max_streams_open: int = 0
    streams_total: int = 0
    streams_cut: int = 0
    events_sent: int = 0
    result_requests_by_run: Counter[str] = field(default_factory=Counter)
    result_open_by_run: Counter[str] = field(default_factory=Counter)
    max_result_open_by_run: Counter[str] = field(default_factory=Counter)
    betas: Counter[tuple[str, str]] = field(default_factory=Counter)

    def reset(self) -> None:
        """Zero the counters; gauges keep their live value and maxima restart from it."""
        self.requests.clear()
        self.statuses.clear()
        self.result_timeouts.clear()
        self.runs_created = 0
        self.rate_limited = 0
        self.dropped = 0
        self.max_result_in_flight = self.result_in_flight
        self.max_requests_in_flight = self.requests_in_flight
        self.max_open_connections = self.open_connections
        self.connections_total = 0
        self.max_streams_open = self.streams_open
        self.streams_total = 0
        self.streams_cut = 0
        self.events_sent = 0
        self.result_requests_by_run.clear()
        self.betas.clear()
        self.max_result_open_by_run = Counter(self.result_open_by_run)

    def stream_opened(self) -> None:
        """Record an SSE stream whose headers were sent."""
        self.streams_total += 1
        self.streams_open += 1
        self.max_streams_open = max(self.max_streams_open, self.streams_open)

    def stream_closed(self) -> None:
        """Record the end of an SSE stream (normal, cut or client gone)."""
        self.streams_open -= 1

    def request_started(self) -> None:
        """Record a request whose handling started."""
        self.requests_in_flight += 1
        self.max_requests_in_flight = max(self.max_requests_in_flight, self.requests_in_flight)

    def request_finished(self) -> None:
        """Record a request whose handling ended (answered, dropped or abandoned)."""
        self.requests_in_flight -= 1

    def result_started(self) -> None:
        """Record that a ``/result`` request started being held."""
        self.result_in_flight += 1
        self.max_result_in_flight = max(self.max_result_in_flight, self.result_in_flight)

    def result_finished(self) -> None:
        """Record that a held ``/result`` request stopped waiting."""
        self.result_in_flight -= 1

    def result_request_opened(self, run_id: str) -> None:
        """Record a ``/result`` request for ``run_id`` that reached the handler."""
        self.result_requests_by_run[run_id] += 1
        self.result_open_by_run[run_id] += 1
        now_open = self.result_open_by_run[run_id]
        self.max_result_open_by_run[run_id] = max(self.max_result_open_by_run[run_id], now_open)

    def result_request_closed(self, run_id: str) -> None:
        """Record the end of a ``/result`` request for ``run_id`` (answered or abandoned)."""
        self.result_open_by_run[run_id] -= 1
        if self.result_open_by_run[run_id] <= 0:
            del self.result_open_by_run[run_id]

    def connection_opened(self) -> None:
        """Record an accepted TCP connection."""
        self.connections_total += 1
        self.open_connections += 1
        self.max_open_connections = max(self.max_open_connections, self.open_connections)

    def connection_closed(self) -> None:
        """Record a closed TCP connection."""
        self.open_connections -= 1

    def responded(self, status: int) -> None:
        """Record a response sent with ``status``."""
        self.statuses[status] += 1
        if status == 429:
            self.rate_limited += 1

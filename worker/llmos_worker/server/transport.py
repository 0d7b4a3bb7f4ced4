"""The HTTP transport's own defences: read deadlines and a cap on open connections.

uvicorn's h11 protocol times out only an idle keep-alive connection, and its idle timer is
re-armed by every byte that arrives, so a client that sends one header byte every few seconds
(slowloris), or a body shorter than its Content-Length, holds its socket forever; enough of them
exhaust the process's file descriptors. `guarded_protocol` returns uvicorn's `H11Protocol` with:

- a head deadline: a request's line and headers must be complete `header_timeout_s` after the
  connection became ready for it (accepted, or the previous response finished), however the bytes
  trickle in. That also bounds an idle keep-alive connection;
- a body deadline: the whole body must arrive within `body_timeout_s` of the head;
- a cap on open connections: past `max_connections`, a new connection first evicts the oldest one
  that is still waiting for a request head (idle or slow: it costs nobody real work), and only when
  every connection is inside a request is the new one answered `503` with `Retry-After` and closed.
  The socket is accepted and closed at once, so the file descriptors in use stay bounded.

A connection closed at a deadline gets `408` when it had sent part of a request and is dropped
silently when it had sent nothing. Generating a response has no deadline here: a long stream is
legitimate work, bounded by `max_tokens` and the engine. Every refusal and eviction is counted in
`TransportStats` (exported as metrics) and logged at DEBUG, never one line per event at INFO.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransportLimits:
    """Deadlines (seconds) and the connection cap of one listener."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 8192
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError("read timeouts must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


@dataclass
class TransportStats:
    """What the transport refused or cut, since start (read by the metrics page)."""

    header_timeouts: int = 0
    body_timeouts: int = 0
    evicted_idle: int = 0
    refused_at_cap: int = 0
    open_connections: int = 0
    peak_connections: int = 0
    waiting_for_head: set[GuardedH11Protocol] = field(default_factory=set)


def _raw_response(status: int, reason: str, message: str, code: str, retry_after: int) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "service_unavailable_error" if status == 503 else "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        + (f"retry-after: {retry_after}\r\n" if status == 503 else "")
        + "connection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """`H11Protocol` with head/body deadlines and the connection cap (see the module doc)."""

    limits: TransportLimits = TransportLimits()
    stats: TransportStats = TransportStats()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: Any = None  # the h11 state of the client side the deadline was armed for
        self._phase_since = 0.0
        self._bytes_in_phase = 0
        self._refused = False

    # ------------------------------------------------------------------ life cycle
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        stats, limits = self.stats, self.limits
        if len(self.connections) > limits.max_connections and not self._evict_one_idle():
            self._refused = True
            stats.refused_at_cap += 1
            log.debug(
                "connection refused: %d open, the cap is %d",
                len(self.connections) - 1,
                limits.max_connections,
            )
            transport.write(
                _raw_response(
                    503,
                    "Service Unavailable",
                    f"the server holds its maximum of {limits.max_connections} connections; "
                    "retry shortly",
                    "too_many_connections",
                    limits.retry_after_s,
                )
            )
            transport.close()
            return
        stats.open_connections = len(self.connections)
        stats.peak_connections = max(stats.peak_connections, stats.open_connections)
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self.stats.waiting_for_head.discard(self)
        super().connection_lost(exc)
        self.stats.open_connections = len(self.connections)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._bytes_in_phase += len(data)
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next cycle and read a pipelined request
        self._track()

    # ------------------------------------------------------------------ deadlines
    def _track(self) -> None:
        """Arm the deadline that fits the client side's current state, when it changed."""
        if self.transport is None or self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is self._phase:
            return
        self._phase = state
        self._phase_since = time.monotonic()
        self._bytes_in_phase = 0 if state is h11.IDLE else self._bytes_in_phase
        self._cancel_deadline()
        if state is h11.IDLE:
            self.stats.waiting_for_head.add(self)
            self._deadline = self.loop.call_later(self.limits.header_timeout_s, self._expire)
        else:
            self.stats.waiting_for_head.discard(self)
            if state is h11.SEND_BODY:
                self._deadline = self.loop.call_later(self.limits.body_timeout_s, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self.cycle is not None and not self.cycle.response_complete:
                return  # why: IDLE only between cycles; a response in progress is not ours to cut
            self.stats.header_timeouts += 1
            what = "request head"
        elif state is h11.SEND_BODY:
            self.stats.body_timeouts += 1
            what = "request body"
        else:
            return
        log.debug("closing %s: %s not complete in time", self.client, what)
        self.stats.waiting_for_head.discard(self)
        if (
            self._bytes_in_phase
            and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)
            and (self.cycle is None or not self.cycle.response_started)
        ):
            self.transport.write(
                _raw_response(408, "Request Timeout", f"the {what} took too long", "timeout", 0)
            )
        self.transport.close()
        # why: the app may be waiting on the body; connection_lost tells it the client is gone
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _evict_one_idle(self) -> bool:
        """Close the longest-waiting connection that has no request in progress."""
        waiting = [c for c in self.stats.waiting_for_head if c is not self]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._phase_since)
        self.stats.waiting_for_head.discard(oldest)
        self.stats.evicted_idle += 1
        oldest._cancel_deadline()
        oldest.transport.close()
        self.connections.discard(oldest)  # why: counted out now, not at connection_lost
        return True


class TransportCollector:
    """The transport's counters as Prometheus metrics (`llmos_http_*`)."""

    def __init__(self, stats: TransportStats, state: Callable[[], Any]) -> None:
        self.stats = stats
        self.state = state  # () -> the ServerState, for the in-flight request count

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield GaugeMetricFamily(
            "llmos_http_open_connections", "Open HTTP connections.", value=s.open_connections
        )
        yield GaugeMetricFamily(
            "llmos_http_peak_connections",
            "Most HTTP connections open at once since start.",
            value=s.peak_connections,
        )
        yield GaugeMetricFamily(
            "llmos_http_requests_in_flight",
            "API requests being read, queued or answered.",
            value=self.state().inflight_requests,
        )
        closed = CounterMetricFamily(
            "llmos_http_connections_closed",
            "Connections the server closed: a deadline passed, or evicted at the cap while idle.",
            labels=["reason"],
        )
        closed.add_metric(["header_timeout"], s.header_timeouts)
        closed.add_metric(["body_timeout"], s.body_timeouts)
        closed.add_metric(["evicted_idle"], s.evicted_idle)
        yield closed
        yield CounterMetricFamily(
            "llmos_http_connections_refused",
            "Connections answered 503 at once because every connection was inside a request.",
            value=s.refused_at_cap,
        )


def guarded_protocol(limits: TransportLimits) -> tuple[type[GuardedH11Protocol], TransportStats]:
    """A protocol class bound to `limits`, and the stats its connections share."""
    stats = TransportStats()
    cls = type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "stats": stats})
    return cls, stats

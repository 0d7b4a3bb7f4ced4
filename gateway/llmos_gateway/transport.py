"""The listener's own defences: read deadlines and a cap on open connections.

uvicorn's h11 protocol only times out an idle keep-alive connection, and every byte that arrives
re-arms that timer, so a client trickling a header byte every few seconds (slowloris), or sending
a body shorter than its Content-Length, would hold a socket forever. `guarded_protocol` returns a
subclass of uvicorn's `H11Protocol` with:

- a head deadline: line and headers complete within `header_timeout_s` of the connection becoming
  ready for a request (accepted, or the previous response done); this also bounds idle keep-alive;
- a body deadline: the whole body within `body_timeout_s` of the head;
- a connection cap: past `max_connections`, a new connection evicts the oldest one still waiting
  for a request head (it costs nobody work); when every connection is inside a request the new one
  is answered `503` + `Retry-After` and closed, so descriptors in use stay bounded.

A connection cut at a deadline gets `408` when it had sent part of a request, nothing when it had
sent nothing. Streaming a response has no deadline here: a long generation is legitimate work.
Refusals and evictions are counted in `TransportStats` (metrics) and logged at DEBUG only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmos_gateway.errors import error_body

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
    """What the listener refused or cut since start (read by the metrics page)."""

    header_timeouts: int = 0
    body_timeouts: int = 0
    evicted_idle: int = 0
    refused_at_cap: int = 0
    open_connections: int = 0
    waiting_for_head: set[GuardedH11Protocol] = field(default_factory=set)


def _raw(status: int, reason: str, message: str, code: str, retry_after: int | None) -> bytes:
    body = error_body(status, message, code)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        + (f"retry-after: {retry_after}\r\n" if retry_after is not None else "")
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
        self._phase: Any = None  # the client-side h11 state the deadline was armed for
        self._phase_since = 0.0
        self._bytes_in_phase = 0
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict_one_idle():
            self._refused = True
            self.stats.refused_at_cap += 1
            log.debug("connection refused at the cap of %d", self.limits.max_connections)
            message = (
                f"the gateway holds its maximum of {self.limits.max_connections} connections; "
                "retry shortly"
            )
            transport.write(
                _raw(
                    503,
                    "Service Unavailable",
                    message,
                    "too_many_connections",
                    self.limits.retry_after_s,
                )
            )
            transport.close()
            return
        self.stats.open_connections = len(self.connections)
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
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
        super().on_response_complete()
        self._track()

    def _track(self) -> None:
        """Arm the deadline that fits the client side's state, when that state changed."""
        if self.transport is None or self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is self._phase:
            return
        self._phase = state
        self._phase_since = time.monotonic()
        if state is h11.IDLE:
            self._bytes_in_phase = 0
        self._cancel()
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
                return  # why: IDLE between cycles only; a response in progress is not ours to cut
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
                _raw(408, "Request Timeout", f"the {what} took too long", "timeout", None)
            )
        self.transport.close()
        if self.cycle is not None and not self.cycle.response_complete:
            # why: the app may be waiting on the body; tell it the client is gone
            self.cycle.disconnected = True
            self.cycle.message_event.set()

    def _cancel(self) -> None:
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
        oldest._cancel()
        oldest.transport.close()
        self.connections.discard(oldest)  # why: counted out now, not at connection_lost
        return True


def guarded_protocol(limits: TransportLimits) -> tuple[type[GuardedH11Protocol], TransportStats]:
    """A protocol class bound to `limits`, and the stats its connections share."""
    stats = TransportStats()
    cls = type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "stats": stats})
    return cls, stats

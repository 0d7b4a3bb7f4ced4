"""Weighted fair queuing of requests across tenants while the pool is saturated.

The pool takes `capacity()` requests at once (the ready replicas times the requests each may
have in flight from this gateway). Below that a request goes straight through. At capacity it
waits in a queue ordered by (priority, virtual finish tag): a tenant's request gets the tag
`max(virtual time, that tenant's last tag) + cost / weight`, and the virtual time advances to the
tag of each request dispatched (start-time fair queuing). So while tenants are backlogged each is
served in proportion to its weight whatever its arrival rate, a tenant that was idle starts at
the current virtual time (no credit saved up), and a lower priority value is always served
first. Waiting is bounded in number and time; a waiter that gives up leaves no slot taken.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from llmos_gateway.errors import HTTPError


@dataclass(order=True)
class _Waiter:
    priority: int
    tag: float
    seq: int
    tenant: str = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class FairQueue:
    """Admission slots for the pool, handed out fairly by tenant weight and priority."""

    def __init__(
        self,
        capacity: Callable[[], int],
        *,
        max_queued: int = 4096,
        timeout_s: float = 120.0,
        retry_after_s: float = 5.0,
    ) -> None:
        self.capacity = capacity
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.inflight = 0
        self._vtime = 0.0
        self._last_tag: dict[str, float] = {}
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()
        self._stale = 0
        self.queued_by_tenant: dict[str, int] = {}

    @property
    def queued(self) -> int:
        return sum(self.queued_by_tenant.values())

    async def acquire(
        self, tenant: str, *, weight: float = 1.0, priority: int = 0, cost: float = 1.0
    ) -> None:
        """Return holding one slot (give it back with `release`), or raise a 503."""
        if not self._heap and self.inflight < self.capacity():
            self.inflight += 1
            return
        if self.queued >= self.max_queued:
            raise HTTPError(
                503,
                "the pool is saturated and its queue is full",
                code="pool_saturated",
                retry_after_s=self.retry_after_s,
            )
        tag = max(self._vtime, self._last_tag.get(tenant, 0.0)) + cost / max(weight, 1e-6)
        self._last_tag[tenant] = tag
        waiter = _Waiter(
            priority, tag, next(self._seq), tenant, asyncio.get_running_loop().create_future()
        )
        heapq.heappush(self._heap, waiter)
        self.queued_by_tenant[tenant] = self.queued_by_tenant.get(tenant, 0) + 1
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # why: dispatched just as it gave up; the slot goes on
            else:
                waiter.future.cancel()
                self._forget(waiter)
                self._stale += 1
                if self._stale > len(self._heap) // 2:
                    # why: given-up waiters are skipped lazily; never let them pile up
                    self._heap = [w for w in self._heap if not w.future.done()]
                    heapq.heapify(self._heap)
                    self._stale = 0
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise HTTPError(
                503,
                f"the pool stayed saturated for {self.timeout_s:g} s; retry later",
                code="pool_saturated",
                retry_after_s=self.retry_after_s,
            ) from None

    def _forget(self, waiter: _Waiter) -> None:
        left = self.queued_by_tenant.get(waiter.tenant, 1) - 1
        if left:
            self.queued_by_tenant[waiter.tenant] = left
        else:
            self.queued_by_tenant.pop(waiter.tenant, None)

    def release(self) -> None:
        self.inflight = max(0, self.inflight - 1)
        self.dispatch()

    def dispatch(self) -> None:
        """Hand free slots to the best waiters (also when the capacity grew)."""
        while self._heap and self.inflight < self.capacity():
            waiter = heapq.heappop(self._heap)
            if waiter.future.done():  # why: it gave up and was already forgotten
                self._stale = max(0, self._stale - 1)
                continue
            self._forget(waiter)
            self._vtime = max(self._vtime, waiter.tag)
            self.inflight += 1
            waiter.future.set_result(None)
        if not self._heap:
            # why: once nobody waits, no tenant carries a lead into the next busy period
            self._last_tag.clear()

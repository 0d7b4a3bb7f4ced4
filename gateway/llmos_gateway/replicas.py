"""The pool as the gateway sees it: replicas, their load, and which of them are ready.

A `Replica` is one worker's base URL with a stable name (the pod name in a cluster, the URL for a
static list), the model version it serves (canary), the requests this gateway has in flight on it,
and the load it last reported on `/metrics` (`llmos_num_requests_running`, `..._waiting`,
`llmos_kv_cache_usage_perc`). `Pool` holds the current set; discovery replaces it and keeps the
state of replicas that stay. A replica that refused a connection or failed a request is ejected for
`eject_s` (skipped by routing) unless it is the only way left; a successful scrape or request
clears that early.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

LOAD_METRICS = {
    "llmos_num_requests_running": "running",
    "llmos_num_requests_waiting": "waiting",
    "llmos_kv_cache_usage_perc": "kv_usage",
}


@dataclass
class Load:
    """What a replica last reported (zeros until its first scrape)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0


@dataclass(eq=False)
class Replica:
    """One worker endpoint and what the gateway knows about it."""

    name: str
    url: str  # base URL, no trailing slash
    version: str = "stable"
    metrics_url: str | None = None  # None: the API URL + /metrics
    inflight: int = 0  # this gateway's requests on it now
    load: Load = field(default_factory=Load)
    ejected_until: float = 0.0

    def score(self) -> float:
        """Queue length as routing reads it: own in-flight or reported running + waiting
        (whichever is larger: other gateways' requests show only in the report)."""
        return float(max(self.inflight, self.load.running + self.load.waiting))

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until


def parse_load(text: str) -> Load:
    """The three load gauges of a worker's /metrics page (summed over label sets)."""
    load = Load()
    for family in text_string_to_metric_families(text):
        attr = LOAD_METRICS.get(family.name)
        if attr is None:
            continue
        setattr(load, attr, sum(s.value for s in family.samples if s.name == family.name))
    return load


class Pool:
    """The replicas of one pool, replaced wholesale by discovery; waiters learn of changes."""

    def __init__(
        self, *, eject_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.eject_s = eject_s
        self.clock = clock
        self._replicas: dict[str, Replica] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def replace(self, replicas: Iterable[Replica]) -> None:
        """The ready replicas now; one that stays keeps its in-flight count and load."""
        fresh: dict[str, Replica] = {}
        for r in replicas:
            old = self._replicas.get(r.name)
            if old is not None and old.url == r.url:
                old.version, old.metrics_url = r.version, r.metrics_url
                fresh[r.name] = old
            else:
                fresh[r.name] = r
        changed = fresh.keys() != self._replicas.keys()
        self._replicas = fresh
        if changed:
            log.info("pool has %d ready replica(s): %s", len(fresh), ", ".join(sorted(fresh)))
            for listener in self._listeners:
                listener()

    def all(self) -> list[Replica]:
        return list(self._replicas.values())

    def available(self, version: str | None = None) -> list[Replica]:
        """Ready replicas (of `version`), the ejected ones only when nothing else is left."""
        now = self.clock()
        pool = [r for r in self._replicas.values() if version is None or r.version == version]
        healthy = [r for r in pool if not r.ejected(now)]
        return healthy or pool

    def versions(self) -> set[str]:
        return {r.version for r in self._replicas.values()}

    def eject(self, replica: Replica) -> None:
        replica.ejected_until = self.clock() + self.eject_s

    def __len__(self) -> int:
        return len(self._replicas)


class LoadScraper:
    """Reads every replica's /metrics every `interval_s` (concurrently, short timeout)."""

    def __init__(
        self,
        pool: Pool,
        client: httpx.AsyncClient,
        *,
        interval_s: float = 1.0,
        timeout_s: float = 1.0,
    ) -> None:
        self.pool = pool
        self.client = client
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    async def scrape_one(self, replica: Replica) -> None:
        url = replica.metrics_url or replica.url + "/metrics"
        try:
            response = await self.client.get(url, timeout=self.timeout_s)
            response.raise_for_status()
            replica.load = parse_load(response.text)
            replica.ejected_until = 0.0
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("scrape of %s failed: %s", replica.name, exc)

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape_one(r) for r in self.pool.all()))

    async def run(self) -> None:
        while True:
            await self.scrape_all()
            await asyncio.sleep(self.interval_s)

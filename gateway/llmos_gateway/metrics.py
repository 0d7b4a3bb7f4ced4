"""The gateway's Prometheus metrics (`llmos_gateway_*`), in a registry of its own."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from llmos_gateway.fairqueue import FairQueue
from llmos_gateway.replicas import Pool
from llmos_gateway.transport import TransportStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _LiveCollector:
    """Gauges read at scrape time: ready replicas, in-flight per replica, the listener."""

    def __init__(self, pool: Pool, transport: TransportStats | None) -> None:
        self.pool = pool
        self.transport = transport
        self.fair: FairQueue | None = None

    def collect(self) -> Iterator[Metric]:
        replicas = self.pool.all()
        yield GaugeMetricFamily(
            "llmos_gateway_replicas_ready",
            "Ready replicas the gateway routes to.",
            value=len(replicas),
        )
        inflight = GaugeMetricFamily(
            "llmos_gateway_replica_inflight",
            "This gateway's requests in flight per replica.",
            labels=["replica", "version"],
        )
        for r in replicas:
            inflight.add_metric([r.name, r.version], r.inflight)
        yield inflight
        if self.fair is not None:
            queued = GaugeMetricFamily(
                "llmos_gateway_queued_requests",
                "Requests waiting for a slot of the saturated pool, by tenant.",
                labels=["tenant"],
            )
            for tenant, n in sorted(self.fair.queued_by_tenant.items()):
                # why: anonymous callers are one label, not one series per client address
                queued.add_metric([tenant if not tenant.startswith("ip:") else "anonymous"], n)
            yield queued
            yield GaugeMetricFamily(
                "llmos_gateway_admitted_requests",
                "Requests holding one of the pool's slots.",
                value=self.fair.inflight,
            )
        if self.transport is not None:
            s = self.transport
            yield GaugeMetricFamily(
                "llmos_gateway_http_open_connections",
                "Open client connections.",
                value=s.open_connections,
            )
            closed = CounterMetricFamily(
                "llmos_gateway_http_connections_closed",
                "Client connections closed at a read deadline or evicted idle at the cap.",
                labels=["reason"],
            )
            closed.add_metric(["header_timeout"], s.header_timeouts)
            closed.add_metric(["body_timeout"], s.body_timeouts)
            closed.add_metric(["evicted_idle"], s.evicted_idle)
            closed.add_metric(["refused_at_cap"], s.refused_at_cap)
            yield closed


class GatewayMetrics:
    def __init__(self, pool: Pool, transport: TransportStats | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._live = _LiveCollector(pool, transport)
        self.registry.register(self._live)
        r = self.registry
        self.requests = Counter(
            "llmos_gateway_requests",
            "Requests answered, by route, tenant, status and version.",
            ["route", "tenant", "status", "version"],
            registry=r,
        )
        self.decisions = Counter(
            "llmos_gateway_routing_decisions",
            "Replica choices by strategy and outcome (affinity, cached, overflow, least_load, "
            "round_robin).",
            ["strategy", "outcome"],
            registry=r,
        )
        self.affinity_lookups = Counter(
            "llmos_gateway_prefix_affinity_lookups", "Prefix-routed requests.", registry=r
        )
        self.affinity_hits = Counter(
            "llmos_gateway_prefix_affinity_hits",
            "Prefix-routed requests that went to their prefix's home replica or to the replica "
            "that served it last.",
            registry=r,
        )
        self.held = Gauge(
            "llmos_gateway_held_requests",
            "Requests held while the pool has no ready replica.",
            registry=r,
        )
        self.hold_expired = Counter(
            "llmos_gateway_hold_expired",
            "Held requests answered 503 at the hold timeout.",
            registry=r,
        )
        self.scale_requests = Counter(
            "llmos_gateway_scale_requests",
            "Scale-from-zero requests sent.",
            ["result"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "llmos_gateway_upstream_requests",
            "Requests sent to each replica (retries included).",
            ["replica", "version"],
            registry=r,
        )
        self.retries = Counter(
            "llmos_gateway_retries",
            "Requests retried on another replica, by reason.",
            ["reason"],
            registry=r,
        )
        self.upstream_ttfb = Histogram(
            "llmos_gateway_upstream_first_byte_seconds",
            "Upstream request sent to its first response byte.",
            ["version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "llmos_gateway_upstream_duration_seconds",
            "Upstream request sent to its last response byte.",
            ["version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_timeouts = Counter(
            "llmos_gateway_upstream_timeouts",
            "Requests answered 504 because the replica did not answer within the read timeout "
            "(not retried; the replica stays in rotation).",
            registry=r,
        )
        self.upstream_cut = Counter(
            "llmos_gateway_upstream_cut",
            "Responses cut because the replica failed after the first byte (never retried).",
            registry=r,
        )
        self.rate_limited = Counter(
            "llmos_gateway_rate_limited",
            "Requests refused with 429 by the tenant's RPM/TPM.",
            ["tenant"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "llmos_gateway_queue_wait_seconds",
            "Time a request waited for a slot of the saturated pool (0 when it had one).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.client_aborts = Counter(
            "llmos_gateway_client_aborts",
            "Responses cut because the client went away (the upstream request is closed).",
            registry=r,
        )

    def watch_queue(self, fair: FairQueue) -> None:
        self._live.fair = fair

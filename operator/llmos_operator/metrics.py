"""The operator's own Prometheus metrics: one registry, one `/metrics` page, typed helpers.

Everything lives on an `OperatorMetrics` object with its own `CollectorRegistry` (never the
global one), so tests build a fresh one and read it back; the process-wide instance other modules
increment is `OPERATOR_METRICS` (one operator process serves one `/metrics` page, the same
reason prometheus_client keeps a default registry). Series (all prefixed `llmos_operator_`):
reconciles by kind and outcome and their duration, autoscaler decisions and observed metric,
desired / spec / ready replicas per pool, model phase, quota usage and limits per namespace,
webhook admissions by verdict. Label values are object names, bounded by what exists; a pool or
model that is deleted is forgotten (`forget_pool`, `forget_model`) so no stale series linger.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import kopf
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from llmos_operator.controllers.errors import InvalidSpec, WaitingForDependency

MODEL_PHASES = ("Pending", "Loading", "Ready", "Failed")


class DecisionLike(Protocol):
    """What `record_decision` reads (llmos_operator.autoscaling.Decision satisfies it)."""

    @property
    def direction(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def desired_replicas(self) -> int: ...
    @property
    def metric_value(self) -> float | None: ...
    @property
    def unknown_pods(self) -> int: ...


def outcome_of(exc: BaseException | None) -> str:
    """success | retry (kopf.TemporaryError, waiting for a dependency) | failed
    (kopf.PermanentError, an invalid spec) | error (anything else)."""
    if exc is None:
        return "success"
    if isinstance(exc, kopf.TemporaryError | WaitingForDependency):
        return "retry"
    if isinstance(exc, kopf.PermanentError | InvalidSpec):
        return "failed"
    return "error"


class OperatorMetrics:
    """The operator's series on one registry; see the module docstring for the list."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            "llmos_operator_reconciles",
            "Reconciles by kind and outcome (success, retry, failed, error).",
            ["kind", "outcome"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "llmos_operator_reconcile_duration_seconds",
            "Wall time of one reconcile, by kind.",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.autoscaler_decisions = Counter(
            "llmos_operator_autoscaler_decisions",
            "Autoscaler decisions by pool, direction (up, down, hold) and reason.",
            ["namespace", "pool", "direction", "reason"],
            registry=r,
        )
        self.autoscaler_metric = Gauge(
            "llmos_operator_autoscaler_metric_value",
            "Per-replica mean of the pool's scaling metric at the last decision.",
            ["namespace", "pool", "metric"],
            registry=r,
        )
        self.autoscaler_target = Gauge(
            "llmos_operator_autoscaler_metric_target",
            "Per-replica target of the pool's scaling metric.",
            ["namespace", "pool", "metric"],
            registry=r,
        )
        self.autoscaler_unknown_pods = Gauge(
            "llmos_operator_autoscaler_unknown_pods",
            "Replicas whose metrics were unknown (unreachable or not ready) at the last decision.",
            ["namespace", "pool"],
            registry=r,
        )
        self.pool_desired_replicas = Gauge(
            "llmos_operator_pool_desired_replicas",
            "Replicas the autoscaler (or spec, without autoscaling) wants for the pool.",
            ["namespace", "pool"],
            registry=r,
        )
        self.pool_replicas = Gauge(
            "llmos_operator_pool_replicas",
            "The pool's spec.replicas.",
            ["namespace", "pool"],
            registry=r,
        )
        self.pool_ready_replicas = Gauge(
            "llmos_operator_pool_ready_replicas",
            "The pool's ready worker pods (status.readyReplicas).",
            ["namespace", "pool"],
            registry=r,
        )
        self.model_phase = Gauge(
            "llmos_operator_model_phase",
            "1 for the LLMModel's current phase, 0 for the others.",
            ["namespace", "model", "phase"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "llmos_operator_model_load_failures",
            "LLMModel loads that ended Failed.",
            ["namespace", "model"],
            registry=r,
        )
        self.quota_usage = Gauge(
            "llmos_operator_quota_usage",
            "What a namespace uses of a quota resource (gpus, inferencePools, totalReplicas).",
            ["namespace", "resource"],
            registry=r,
        )
        self.quota_limit = Gauge(
            "llmos_operator_quota_limit",
            "The strictest QuotaPolicy limit on a namespace's quota resource.",
            ["namespace", "resource", "policy"],
            registry=r,
        )
        self.webhook_admissions = Counter(
            "llmos_operator_webhook_admissions",
            "Admission reviews answered, by kind, operation and verdict (allowed, denied).",
            ["kind", "operation", "verdict"],
            registry=r,
        )

    # -- reconciles ----------------------------------------------------------------------------

    @contextmanager
    def reconcile(self, kind: str) -> Iterator[None]:
        """Time and count the body as one reconcile of `kind`; the exception decides the outcome.

        Usage: `with OPERATOR_METRICS.reconcile("InferencePool"): ...` (exceptions re-raised).
        """
        start = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            self.reconciles.labels(kind, outcome_of(exc)).inc()
            raise
        else:
            self.reconciles.labels(kind, "success").inc()
        finally:
            self.reconcile_duration.labels(kind).observe(time.perf_counter() - start)

    # -- pools and the autoscaler --------------------------------------------------------------

    def record_pool(self, namespace: str, pool: str, *, replicas: int, ready: int) -> None:
        self.pool_replicas.labels(namespace, pool).set(replicas)
        self.pool_ready_replicas.labels(namespace, pool).set(ready)

    def record_desired(self, namespace: str, pool: str, desired: int) -> None:
        self.pool_desired_replicas.labels(namespace, pool).set(desired)

    def record_decision(
        self, namespace: str, pool: str, metric: str, target: float, decision: DecisionLike
    ) -> None:
        self.autoscaler_decisions.labels(namespace, pool, decision.direction, decision.reason).inc()
        self.record_desired(namespace, pool, decision.desired_replicas)
        self.autoscaler_target.labels(namespace, pool, metric).set(target)
        self.autoscaler_unknown_pods.labels(namespace, pool).set(decision.unknown_pods)
        if decision.metric_value is not None:
            self.autoscaler_metric.labels(namespace, pool, metric).set(decision.metric_value)

    def forget_pool(self, namespace: str, pool: str) -> None:
        """Drop every series labelled with this pool (it was deleted)."""
        for family in (
            self.autoscaler_decisions,
            self.autoscaler_metric,
            self.autoscaler_target,
            self.autoscaler_unknown_pods,
            self.pool_desired_replicas,
            self.pool_replicas,
            self.pool_ready_replicas,
        ):
            _remove_matching(family, {"namespace": namespace, "pool": pool})

    # -- models ----------------------------------------------------------------------------------

    def record_model_phase(self, namespace: str, model: str, phase: str) -> None:
        """Set the phase gauge (one-hot over MODEL_PHASES); count a transition into Failed."""
        was_failed = _gauge_value(self.model_phase, (namespace, model, "Failed")) == 1.0
        for candidate in MODEL_PHASES:
            self.model_phase.labels(namespace, model, candidate).set(
                1.0 if candidate == phase else 0.0
            )
        if phase == "Failed" and not was_failed:
            self.model_load_failures.labels(namespace, model).inc()

    def forget_model(self, namespace: str, model: str) -> None:
        for family in (self.model_phase, self.model_load_failures):
            _remove_matching(family, {"namespace": namespace, "model": model})

    # -- quota and admission ---------------------------------------------------------------------

    def record_quota(
        self,
        namespace: str,
        resource: str,
        *,
        used: float,
        limit: float | None = None,
        policy: str = "",
    ) -> None:
        self.quota_usage.labels(namespace, resource).set(used)
        if limit is not None:
            self.quota_limit.labels(namespace, resource, policy).set(limit)

    def record_admission(self, kind: str, operation: str, *, allowed: bool) -> None:
        self.webhook_admissions.labels(kind, operation, "allowed" if allowed else "denied").inc()

    # -- exposition ------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Serve `/metrics` on a daemon thread (prometheus_client's own HTTP server)."""
        start_http_server(port, addr=host, registry=self.registry)


def _gauge_value(family: Gauge, labels: tuple[str, ...]) -> float | None:
    for metric in family.collect():
        for sample in metric.samples:
            if tuple(sample.labels.get(n, "") for n in family._labelnames) == labels:
                return sample.value
    return None


def _remove_matching(family: Counter | Gauge | Histogram, match: dict[str, str]) -> None:
    names = family._labelnames
    seen: set[tuple[str, ...]] = set()
    for metric in family.collect():
        for sample in metric.samples:
            if all(sample.labels.get(k) == v for k, v in match.items()):
                seen.add(tuple(sample.labels.get(n, "") for n in names))
    for values in seen:
        family.remove(*values)


OPERATOR_METRICS = OperatorMetrics()
"""The process-wide instance handlers increment and `/metrics` serves."""

"""kopf handlers of InferencePool autoscaling, wired into a registry by `register(...)`.

One timer per InferencePool, every `AutoscalerSettings.interval_s`:
- always: the pool's spec/ready replicas go to the operator's metrics (the pool-not-ready alert);
- `spec.autoscaling.enabled` and mode `builtin`: list the pool's ready worker pods, scrape their
  `/metrics` concurrently (`autoscaling.scrape`), cap by the namespace's QuotaPolicies
  (`quota.allowed_replicas` with maxReplicas asked), `autoscaling.decide`, and write the result
  the scale-compatible way: a patch of the pool's `spec.replicas` (what `kubectl scale` and an
  HPA do through the scale subresource), which the pool reconcile turns into Deployment replicas.
  `status.autoscaling` records the metric, desired replicas, the decision's reason and message
  and the last scale time; every scale also posts a Kubernetes event and counts in the metrics;
- mode `hpa`: ensure the `autoscaling/v2` HPA child (`autoscaling.build_hpa`) and do nothing else;
- otherwise: remove an HPA left by an earlier `hpa` mode.
Per-pool decision history lives in kopf's per-object memo (lost on restart, which `decide`
handles by not scaling down before a full window). Every API call goes through the shared
`KubeClient` (its kind table has Namespace and HorizontalPodAutoscaler).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import kopf
from pydantic import ValidationError

from llmos_operator.api.common import GROUP, VERSION
from llmos_operator.api.inferencepool import PLURAL as POOLS
from llmos_operator.api.inferencepool import Autoscaling
from llmos_operator.autoscaling import (
    Autoscaler,
    Decision,
    Observation,
    ScalingPolicy,
    ScrapeTarget,
    build_hpa,
    hpa_name,
    scrape,
    series_for,
    values_of,
)
from llmos_operator.builders.pool import selector_labels
from llmos_operator.config import OperatorConfig, settings_from_env
from llmos_operator.handlers.registration import STATE
from llmos_operator.handlers.state import OperatorState
from llmos_operator.kube import KubeClient
from llmos_operator.logging import log_context
from llmos_operator.metrics import OPERATOR_METRICS, OperatorMetrics
from llmos_operator.quota import Policy, PolicyError, PoolDemand, allowed_replicas, effective_for
from llmos_operator.quota.usage import namespace_usage
from llmos_operator.status import rfc3339

logger = logging.getLogger(__name__)

MEMO_SCALER = "autoscaler"  # per-object memo key of the pool's Autoscaler
MEMO_HTTP = "autoscaler_http"  # operator memo key of the shared scrape client
MEMO_HPA_GONE = "autoscaler_hpa_gone"  # per-object: no stale HPA left (checked once)


@dataclass(frozen=True)
class AutoscalerSettings:
    """Knobs of the builtin autoscaler; env `LLMOS_OPERATOR_AUTOSCALE_<FIELD>` in a deployment."""

    interval_s: float = 15.0
    scrape_timeout_s: float = 2.0
    concurrency: int = 32
    metrics_path: str = "/metrics"
    port_name: str = "metrics"  # the worker container port serving /metrics (else "http")
    metrics_port: int | None = 8081  # the operator's own /metrics; None = not served

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AutoscalerSettings:
        return cls(**settings_from_env(cls, "LLMOS_OPERATOR_AUTOSCALE_", env))


def policy_of(spec: Autoscaling) -> ScalingPolicy:
    return ScalingPolicy(
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        target=spec.target,
        scale_up_window_s=spec.scale_up_stabilization_seconds,
        scale_down_window_s=spec.scale_down_stabilization_seconds,
    )


def pod_target(pod: Mapping[str, Any], settings: AutoscalerSettings, default_port: int) -> str:
    """The URL of a pod's metrics page, from its IP and its container port named `port_name`
    (a worker run without a metrics port serves /metrics on its `http` port)."""
    ip = str(pod["status"]["podIP"])
    named: dict[str, int] = {}
    for container in pod.get("spec", {}).get("containers", []):
        for p in container.get("ports", []) or []:
            if p.get("name") and p.get("containerPort"):
                named.setdefault(str(p["name"]), int(p["containerPort"]))
    port = named.get(settings.port_name, named.get("http", default_port))
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{settings.metrics_path}"


def is_ready(pod: Mapping[str, Any]) -> bool:
    """Running, Ready=True, not terminating, with an IP: a pod that should be serving."""
    status = pod.get("status") or {}
    if pod.get("metadata", {}).get("deletionTimestamp") or not status.get("podIP"):
        return False
    if status.get("phase") != "Running":
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


async def quota_cap(kube: KubeClient, body: Mapping[str, Any], max_replicas: int) -> int | None:
    """The most replicas the namespace's QuotaPolicies let this pool have (None: no limit)."""
    policies = []
    for item in await kube.list("QuotaPolicy", None):
        try:
            policies.append(Policy.from_body(item))
        except PolicyError:
            continue  # why: the quota handler reports a broken policy; it limits nothing here
    if not policies:
        return None
    namespace = body["metadata"]["namespace"]
    ns = await kube.get("Namespace", None, namespace) or {}
    effective = effective_for(policies, ns.get("metadata", {}).get("labels") or {})
    if not effective.limits:
        return None
    others = [
        PoolDemand.from_body(p)
        for p in await kube.list("InferencePool", namespace)
        if p["metadata"]["name"] != body["metadata"]["name"]
        and not p["metadata"].get("deletionTimestamp")
    ]
    asking = {**body, "spec": {**(body.get("spec") or {}), "replicas": max_replicas}}
    current = int((body.get("spec") or {}).get("replicas") or 0)
    granted, reason = allowed_replicas(asking, effective, namespace_usage(others), current=current)
    return None if reason is None else granted


async def ensure_hpa(kube: KubeClient, body: Mapping[str, Any], spec: Autoscaling) -> str:
    meta = body["metadata"]
    desired = build_hpa(
        pool_name=meta["name"],
        namespace=meta["namespace"],
        metric=spec.metric,
        target=spec.target,
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        scale_up_window_s=spec.scale_up_stabilization_seconds,
        scale_down_window_s=spec.scale_down_stabilization_seconds,
        owner_uid=meta["uid"],
    )
    _, done = await kube.apply(desired)
    return done


async def remove_hpa(kube: KubeClient, namespace: str, name: str) -> None:
    await kube.delete("HorizontalPodAutoscaler", namespace, hpa_name(name))


def autoscaling_status(decision: Decision, previous: Mapping[str, Any], now: str) -> dict[str, Any]:
    """status.autoscaling for a decision; lastScaleTime moves only when replicas change."""
    metric = decision.metric_value
    return {
        "currentMetric": None if metric is None else float(f"{metric:.4g}"),
        "desiredReplicas": decision.desired_replicas,
        "reason": decision.reason,
        "lastDecision": decision.message[:1024],
        "lastScaleTime": now if decision.direction != "hold" else previous.get("lastScaleTime"),
    }


class PoolAutoscaling:
    """The timer body, with its collaborators injected (clock, metrics, settings)."""

    def __init__(
        self,
        settings: AutoscalerSettings,
        *,
        metrics: OperatorMetrics = OPERATOR_METRICS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock

    async def __call__(
        self, *, body: kopf.Body, namespace: str | None, name: str, patch: kopf.Patch, memo: Any
    ) -> None:
        with log_context(namespace=namespace, pool=name):
            await self.tick(body, patch, memo)

    async def tick(self, kbody: kopf.Body, patch: kopf.Patch, memo: Any) -> None:
        body = dict(kbody)
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if body["metadata"].get("deletionTimestamp"):
            return
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        replicas = int(spec.get("replicas") or 0)
        self.metrics.record_pool(
            namespace, name, replicas=replicas, ready=int(status.get("readyReplicas") or 0)
        )
        state: OperatorState = memo[STATE]
        try:
            autoscaling = Autoscaling.model_validate(spec.get("autoscaling") or {})
        except ValidationError:
            return  # why: the pool reconcile reports the invalid spec in conditions
        if not autoscaling.enabled or autoscaling.mode == "hpa":
            memo.pop(MEMO_SCALER, None)
            self.metrics.record_desired(namespace, name, replicas)
            if autoscaling.enabled:
                await ensure_hpa(state.kube, body, autoscaling)
                memo.pop(MEMO_HPA_GONE, None)
            elif not memo.get(MEMO_HPA_GONE):
                # why: an HPA left from an earlier `hpa` mode would fight the new setting
                await remove_hpa(state.kube, namespace, name)
                memo[MEMO_HPA_GONE] = True
            return
        await self.builtin(kbody, autoscaling, patch, memo, state)

    async def builtin(
        self,
        kbody: kopf.Body,
        autoscaling: Autoscaling,
        patch: kopf.Patch,
        memo: Any,
        state: OperatorState,
    ) -> None:
        body = dict(kbody)
        meta, spec = body["metadata"], body.get("spec") or {}
        namespace, name = meta["namespace"], meta["name"]
        pods = [
            p for p in await state.kube.list("Pod", namespace, selector_labels(name)) if is_ready(p)
        ]
        targets = [
            ScrapeTarget(
                p["metadata"]["name"], pod_target(p, self.settings, state.config.worker_port)
            )
            for p in sorted(pods, key=lambda p: str(p["metadata"]["name"]))
        ]
        results = await scrape(
            self._http(memo),
            targets,
            series_for(autoscaling.metric),
            timeout=self.settings.scrape_timeout_s,
            concurrency=self.settings.concurrency,
        )
        for failed in (r for r in results if r.value is None):
            logger.info("pod %s metrics unknown: %s", failed.pod, failed.error)
        current = int(spec.get("replicas") or 0)
        cap = await quota_cap(state.kube, body, autoscaling.max_replicas)
        scaler = memo.get(MEMO_SCALER)
        if not isinstance(scaler, Autoscaler):
            scaler = memo[MEMO_SCALER] = Autoscaler(clock=self.clock)
        decision = scaler.step(
            policy_of(autoscaling), Observation(current, values_of(results), cap)
        )
        self.metrics.record_decision(
            namespace, name, autoscaling.metric, autoscaling.target, decision
        )
        previous = (body.get("status") or {}).get("autoscaling") or {}
        new_status = autoscaling_status(decision, previous, rfc3339(state.clock()))
        if new_status != previous:
            patch.status["autoscaling"] = new_status
        if decision.direction == "hold":
            return
        patch.spec["replicas"] = decision.desired_replicas
        reason = "ScaledUp" if decision.direction == "up" else "ScaledDown"
        logger.info("autoscaler %s: %s", reason, decision.message)
        kopf.event(kbody, type="Normal", reason=reason, message=decision.message)

    def _http(self, memo: Any) -> httpx.AsyncClient:
        client = memo.get(MEMO_HTTP)
        if not isinstance(client, httpx.AsyncClient):
            raise kopf.PermanentError("autoscaler HTTP client missing: register() not used")
        return client


def register(
    registry: kopf.OperatorRegistry,
    config: OperatorConfig,
    settings: AutoscalerSettings | None = None,
    *,
    metrics: OperatorMetrics = OPERATOR_METRICS,
    clock: Callable[[], float] = time.monotonic,
) -> kopf.OperatorRegistry:
    """Add the autoscaling timer (+ the scrape client and metrics server at startup)."""
    settings = settings if settings is not None else AutoscalerSettings.from_env()

    async def start_autoscaler(memo: kopf.Memo, **_: Any) -> None:
        # why: the shared memo is copied into every object's memo, so all pools share one client
        limits = httpx.Limits(max_connections=max(settings.concurrency, 1))
        memo[MEMO_HTTP] = httpx.AsyncClient(limits=limits, trust_env=False)
        if settings.metrics_port is not None:
            metrics.serve(settings.metrics_port)

    async def stop_autoscaler(memo: kopf.Memo, **_: Any) -> None:
        client = memo.get(MEMO_HTTP)
        if isinstance(client, httpx.AsyncClient):
            await client.aclose()

    async def forget_pool(namespace: str | None, name: str, **_: Any) -> None:
        metrics.forget_pool(namespace or "", name)

    kopf.on.startup(registry=registry, id="autoscaler-startup")(start_autoscaler)
    kopf.on.cleanup(registry=registry, id="autoscaler-cleanup")(stop_autoscaler)
    pool = (GROUP, VERSION, POOLS)
    timer = PoolAutoscaling(settings, metrics=metrics, clock=clock)

    async def autoscale(
        body: kopf.Body, namespace: str | None, name: str, patch: kopf.Patch, memo: Any, **_: Any
    ) -> None:
        # why: kopf tells async handlers by inspect.iscoroutinefunction; a callable object fails it
        await timer(body=body, namespace=namespace, name=name, patch=patch, memo=memo)

    kopf.timer(
        *pool,
        interval=settings.interval_s,
        # why: a failed tick (API or scrape trouble) is retried at the next tick, not in 60 s
        backoff=settings.interval_s,
        # why: one slow tick must not block operator shutdown
        timeout=max(settings.interval_s, settings.scrape_timeout_s * 4),
        registry=registry,
        id="autoscale",
    )(autoscale)
    # why: optional = no finalizer of ours; the series just go when the pool does
    kopf.on.delete(*pool, optional=True, registry=registry, id="autoscaler-forget")(forget_pool)
    return registry

"""kopf handlers of QuotaPolicy: admission, usage in status, ResourceQuotas, pool re-evaluation.

Wired by `register_quota(registry)` next to the core handlers' `register(...)`. The API client
comes from the core state in memo (`memo["llmos"].kube`), the quota state (per-namespace locks
and replica grants) from `memo["llmos_quota"]`, made by this module's startup handler, which
also configures kopf's admission server (`AdmissionServer`, settings from an injected
`WebhookConfig` in `memo["webhook"]` or env `LLMOS_WEBHOOK_*`).

- validating admission (`quota-pools`, `quota-models`) for InferencePool / LLMModel CREATE and
  UPDATE: refuses a spec the API models reject (422, one message per error naming its field; on a
  create or an update that changes the spec, so an object admitted earlier still takes metadata
  edits), then what would exceed the strictest selecting policy, naming it and the numbers;
- `reconcile_quotas` (on QuotaPolicy changes, a timer, and pool/model/namespace events): writes
  per-namespace usage into each policy's status, keeps one ResourceQuota per (policy, namespace)
  and deletes the stale ones, renders each pool's rate-limit ConfigMap, and sets each pool's
  `QuotaExceeded` condition (+ `status.quota`) when a tightened policy is now exceeded;
- `replicas_within_quota(memo, body)`: what the pool reconcile calls before sizing the
  Deployment; serialised per namespace, so two pools created at once cannot both take the
  last GPUs (the first grant is recorded before the second is computed).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import kopf
from pydantic import ValidationError

from llmos_operator.api import InferencePoolSpec, LLMModelSpec
from llmos_operator.api.common import GROUP, VERSION, ApiModel, set_condition
from llmos_operator.builders.meta import MANAGED_BY
from llmos_operator.kube import KubeClient, KubeError
from llmos_operator.metrics import OPERATOR_METRICS
from llmos_operator.quota.evaluation import (
    allowed_replicas,
    check_model,
    check_pool,
    model_size_violations,
    pool_violations,
    usage_violations,
)
from llmos_operator.quota.policy import Effective, Policy, PolicyError, effective_for
from llmos_operator.quota.ratelimits import build_rate_limits_configmap
from llmos_operator.quota.resourcequota import POLICY_LABEL, build_resource_quota
from llmos_operator.quota.usage import PoolDemand, namespace_usage
from llmos_operator.quota.webhook import AdmissionServer, WebhookConfig
from llmos_operator.status import invalid_spec_message, rfc3339, utc_now

logger = logging.getLogger(__name__)

QUOTA = "llmos_quota"  # memo key of the QuotaState
CORE = "llmos"  # memo key of the core OperatorState (its .kube is the API client)
WEBHOOK = "webhook"  # memo key of an injected WebhookConfig
CONDITION = "QuotaExceeded"
# (kind, namespace, name) -> the core reconcile's per-object lock (OperatorState.lock)
ObjectLocks = Callable[[str, str, str], asyncio.Lock]


@dataclass
class QuotaState:
    """Shared quota state: per-namespace locks, replicas granted to pools, one reconcile lock."""

    locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    grants: dict[tuple[str, str], int] = field(default_factory=dict)
    reconcile_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # set by pool/model/namespace events; one background task reconciles and clears it
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None


def _kube(memo: kopf.Memo) -> KubeClient:
    kube = getattr(memo[CORE], "kube", None)
    if not isinstance(kube, KubeClient):
        raise kopf.TemporaryError("the API client is not ready yet", delay=1)
    return kube


def _state(memo: kopf.Memo) -> QuotaState:
    state = memo[QUOTA]
    assert isinstance(state, QuotaState)
    return state


async def configure_quota(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = memo.get(WEBHOOK)
    config = config if isinstance(config, WebhookConfig) else WebhookConfig.from_env()
    settings.admission.server = AdmissionServer(config)
    settings.admission.managed = config.managed
    state = memo[QUOTA] = QuotaState()
    state.runner = asyncio.create_task(_reconcile_when_dirty(memo, state))


async def stop_quota(memo: kopf.Memo, **_: Any) -> None:
    state = memo.get(QUOTA)
    if isinstance(state, QuotaState) and state.runner is not None:
        state.runner.cancel()  # why: not awaited; it may be mid-request on a closing client


async def _reconcile_when_dirty(memo: kopf.Memo, state: QuotaState) -> None:
    """Coalesce bursts of events into one reconcile_quotas at a time.

    why: kopf runs an object's event handlers in that object's own worker; reconciling every
    quota inline there would hold a deleting pool's worker behind other objects' reconciles.
    """
    while True:
        await state.dirty.wait()
        state.dirty.clear()
        try:
            await reconcile_quotas(_kube(memo), state, _locks(memo))
        except (KubeError, httpx.HTTPError, kopf.TemporaryError) as exc:
            # why: the next event or the policy timer tries again; the loop must live on
            logger.warning("quota reconcile failed: %s", exc)


async def _policies(kube: KubeClient) -> list[Policy]:
    out: list[Policy] = []
    for body in await kube.list("QuotaPolicy", None):
        try:
            out.append(Policy.from_body(body))
        except PolicyError as exc:  # why: the CRD schema refuses these; never crash on one
            logger.warning("ignoring QuotaPolicy %s: %s", body["metadata"].get("name"), exc)
    return out


async def _effective(kube: KubeClient, namespace: str) -> Effective:
    ns = await kube.get("Namespace", None, namespace)
    labels = ((ns or {}).get("metadata") or {}).get("labels") or {}
    return effective_for(await _policies(kube), labels)


async def _model_size(kube: KubeClient, namespace: str, model: str) -> int | None:
    body = await kube.get("LLMModel", namespace, model) if model else None
    size = ((body or {}).get("status") or {}).get("sizeBytes")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


# --- admission ---------------------------------------------------------------------------------


def _admitted(kind: str, operation: str | None, allowed: bool) -> None:
    OPERATOR_METRICS.record_admission(kind, operation or "", allowed=allowed)


def spec_problem(body: kopf.Body, spec_model: type[ApiModel], kwargs: dict[str, Any]) -> str | None:
    """Why the object's spec is invalid (each error naming its field), or None.

    Only a create, or an update that changes the spec, is judged: an object admitted before
    (or before this rule) must still take metadata edits -- above all its finalizer's removal
    while it is deleted -- or it could never go away."""
    if kwargs.get("subresource") or body.get("metadata", {}).get("deletionTimestamp"):
        return None
    spec = body.get("spec")
    if kwargs.get("operation") == "UPDATE":
        old = kwargs.get("old") or {}
        if old.get("spec") == spec:
            return None
    try:
        spec_model.model_validate(spec if spec is not None else {})
    except ValidationError as exc:
        return invalid_spec_message(exc)
    return None


async def validate_pool(
    body: kopf.Body, namespace: str | None, memo: kopf.Memo, **kwargs: Any
) -> None:
    operation = kwargs.get("operation")  # why: kopf passes it, its WebhookFn type omits it
    problem = spec_problem(body, InferencePoolSpec, kwargs)
    if problem is not None:
        _admitted("InferencePool", operation, False)
        raise kopf.AdmissionError(problem, code=422)
    kube, ns = _kube(memo), namespace or body.get("metadata", {}).get("namespace", "")
    async with _state(memo).locks[ns]:
        effective = await _effective(kube, ns)
        if not effective.policies:
            return
        others = [PoolDemand.from_body(b) for b in await kube.list("InferencePool", ns)]
        demand = PoolDemand.from_body(body)
        size = await _model_size(kube, ns, demand.model)
        verdict = check_pool(dict(body), effective, others, model_size_bytes=size)
    _admitted("InferencePool", operation, verdict.allowed)
    if not verdict.allowed:
        raise kopf.AdmissionError(verdict.message, code=403)


async def validate_model(
    body: kopf.Body, namespace: str | None, memo: kopf.Memo, **kwargs: Any
) -> None:
    operation = kwargs.get("operation")  # why: kopf passes it, its WebhookFn type omits it
    problem = spec_problem(body, LLMModelSpec, kwargs)
    if problem is not None:
        _admitted("LLMModel", operation, False)
        raise kopf.AdmissionError(problem, code=422)
    kube, ns = _kube(memo), namespace or body.get("metadata", {}).get("namespace", "")
    verdict = check_model(dict(body), await _effective(kube, ns))
    _admitted("LLMModel", operation, verdict.allowed)
    if not verdict.allowed:
        raise kopf.AdmissionError(verdict.message, code=403)


# --- the pool reconcile's quota gate -----------------------------------------------------------


async def replicas_within_quota(memo: kopf.Memo, body: dict[str, Any]) -> tuple[int, str | None]:
    """Replicas the pool may run now and why fewer than spec.replicas (None when all).

    Serialised per namespace; the grant is recorded, so a concurrent pool sees it."""
    kube, state = _kube(memo), _state(memo)
    meta = body.get("metadata") or {}
    ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    async with state.locks[ns]:
        effective = await _effective(kube, ns)
        running = ((body.get("status") or {}).get("replicas")) or 0
        current = state.grants.get((ns, name), running)
        others = []
        for other in await kube.list("InferencePool", ns):
            other_name = other["metadata"]["name"]
            if other_name == name or other["metadata"].get("deletionTimestamp"):
                continue
            held = state.grants.get((ns, other_name))
            if held is None:  # never granted since start: count what it runs
                held = int((other.get("status") or {}).get("replicas") or 0)
            others.append(PoolDemand.from_body(other, replicas=held))
        n, reason = allowed_replicas(body, effective, namespace_usage(others), current=current)
        state.grants[(ns, name)] = n
        return n, reason


# --- reconcile ---------------------------------------------------------------------------------


async def reconcile_quotas(
    kube: KubeClient, state: QuotaState, locks: ObjectLocks | None = None
) -> None:
    """Bring every policy's status, every ResourceQuota and every pool's quota view up to date.

    `locks` serialises each pool's status write with the pool reconcile's (same lock)."""
    async with state.reconcile_lock:
        policy_bodies = await kube.list("QuotaPolicy", None)
        policies = {p.name: p for p in await _policies(kube)}
        namespaces = {
            n["metadata"]["name"]: n["metadata"].get("labels") or {}
            for n in await kube.list("Namespace", None)
        }
        pools = [p for p in await kube.list("InferencePool", None) if p.get("metadata")]
        by_ns: dict[str, list[PoolDemand]] = defaultdict(list)
        for pool in pools:
            by_ns[pool["metadata"]["namespace"]].append(PoolDemand.from_body(pool))

        wanted_quotas: set[tuple[str, str]] = set()
        for body in policy_bodies:
            policy = policies.get(body["metadata"]["name"])
            if policy is None:
                continue
            selected = sorted(ns for ns, labels in namespaces.items() if policy.selects(labels))
            for ns in selected:
                rq = build_resource_quota(policy, ns, str(body["metadata"].get("uid", "")))
                if rq is not None:
                    await kube.apply(rq)
                    wanted_quotas.add((ns, rq["metadata"]["name"]))
            await _write_policy_status(kube, body, policy, selected, by_ns)

        for rq in await kube.list(
            "ResourceQuota", None, {"app.kubernetes.io/managed-by": MANAGED_BY}
        ):
            meta = rq["metadata"]
            if POLICY_LABEL in (meta.get("labels") or {}) and (
                (meta["namespace"], meta["name"]) not in wanted_quotas
            ):
                await kube.delete("ResourceQuota", meta["namespace"], meta["name"])

        for ns, labels in namespaces.items():
            _record_usage(
                ns,
                namespace_usage(by_ns.get(ns, [])).to_status(ns),
                effective_for(policies.values(), labels),
            )
        for pool in pools:
            ns = pool["metadata"]["namespace"]
            effective = effective_for(policies.values(), namespaces.get(ns, {}))
            await _write_pool_quota(kube, pool, effective, by_ns[ns], locks)


def _record_usage(namespace: str, usage: dict[str, Any], effective: Effective) -> None:
    """Quota usage and limit gauges of one selected namespace (the quota-exhausted alert)."""
    if not effective.policies:
        return
    for resource in ("gpus", "inferencePools", "totalReplicas"):
        bound = effective.limits.get(resource)
        OPERATOR_METRICS.record_quota(
            namespace,
            resource,
            used=float(usage[resource]),
            limit=None if bound is None else float(bound.value),
            policy="" if bound is None else bound.policy,
        )


async def _write_policy_status(
    kube: KubeClient,
    body: dict[str, Any],
    policy: Policy,
    selected: list[str],
    by_ns: dict[str, list[PoolDemand]],
) -> None:
    usage = [namespace_usage(by_ns.get(ns, [])).to_status(ns) for ns in selected]
    effective = Effective.merge([policy])
    over = [
        msg
        for ns in selected
        for msg in usage_violations(ns, namespace_usage(by_ns.get(ns, [])), effective)
    ]
    status = body.get("status") or {}
    conditions = set_condition(
        status.get("conditions") or [],
        CONDITION,
        "True" if over else "False",
        "OverQuota" if over else "WithinQuota",
        "; ".join(over) or f"{len(selected)} namespace(s) within limits",
        now=rfc3339(utc_now()),
        generation=body["metadata"].get("generation"),
    )
    new = {
        "usage": usage,
        "conditions": conditions,
        "observedGeneration": body["metadata"].get("generation"),
    }
    if _same_status(status, new):
        return
    await kube.patch("QuotaPolicy", None, policy.name, {"status": new}, sub="status")


async def _write_pool_quota(
    kube: KubeClient,
    pool: dict[str, Any],
    effective: Effective,
    demands: list[PoolDemand],
    locks: ObjectLocks | None = None,
) -> None:
    meta = pool["metadata"]
    if meta.get("deletionTimestamp"):
        return
    await kube.apply(build_rate_limits_configmap(pool, effective))
    lock = locks("InferencePool", meta["namespace"], meta["name"]) if locks else asyncio.Lock()
    async with lock:
        # why: the listed body may be stale; conditions are read-modify-written under the
        # lock the pool reconcile holds for its own status writes, so neither drops the other's
        fresh = await kube.get("InferencePool", meta["namespace"], meta["name"])
        if fresh is None or fresh["metadata"].get("deletionTimestamp"):
            return
        await _write_pool_condition(kube, fresh, effective, demands)


async def _write_pool_condition(
    kube: KubeClient, pool: dict[str, Any], effective: Effective, demands: list[PoolDemand]
) -> None:
    meta = pool["metadata"]
    demand = PoolDemand.from_body(pool)
    usage = namespace_usage(demands)
    size = await _model_size(kube, meta["namespace"], demand.model)
    violations = pool_violations(demand, effective) + usage_violations(
        meta["namespace"], usage, effective
    )
    violations += model_size_violations(demand.model, size, effective)
    status = pool.get("status") or {}
    message = "; ".join(violations)
    conditions = set_condition(
        status.get("conditions") or [],
        CONDITION,
        "True" if violations else "False",
        "OverQuota" if violations else "WithinQuota",
        message or _within(effective),
        now=rfc3339(utc_now()),
        generation=meta.get("generation"),
    )
    quota = {"policies": ",".join(effective.policies), "message": message}
    if _same_status(status, {"conditions": conditions, "quota": quota}):
        return
    patch = {"status": {"conditions": conditions, "quota": quota}}
    await kube.patch("InferencePool", meta["namespace"], meta["name"], patch, sub="status")


def _within(effective: Effective) -> str:
    if not effective.policies:
        return "no QuotaPolicy selects this namespace"
    return "within QuotaPolicy " + ", ".join(effective.policies)


def _same_status(current: dict[str, Any], new: dict[str, Any]) -> bool:
    def strip(conditions: Any) -> Any:
        return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions or []]

    for key, value in new.items():
        if key == "conditions":
            if strip(current.get(key)) != strip(value):
                return False
        elif current.get(key) != value:
            return False
    return True


def _locks(memo: kopf.Memo) -> ObjectLocks | None:
    lock = getattr(memo.get(CORE), "lock", None)
    return lock if callable(lock) else None


async def quota_changed(memo: kopf.Memo, **_: Any) -> None:
    await reconcile_quotas(_kube(memo), _state(memo), _locks(memo))


async def pool_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    if QUOTA not in memo or CORE not in memo:
        return
    obj = event.get("object") or {}
    if event.get("type") == "DELETED":
        meta = obj.get("metadata") or {}
        _state(memo).grants.pop((meta.get("namespace", ""), meta.get("name", "")), None)
    _state(memo).dirty.set()


def register_quota(
    registry: kopf.OperatorRegistry, *, interval_s: float = 30.0
) -> kopf.OperatorRegistry:
    """Wire the quota handlers into `registry` (after the core `register`, whose startup
    handler puts the API client into memo)."""
    kopf.on.startup(registry=registry)(configure_quota)
    kopf.on.cleanup(registry=registry)(stop_quota)
    policies = (GROUP, VERSION, "quotapolicies")
    for decorate in (kopf.on.resume, kopf.on.create, kopf.on.update):
        decorate(*policies, registry=registry, id="quota")(quota_changed)
    # why: optional -- no finalizer; the ResourceQuotas go with their owner by garbage collection
    kopf.on.delete(*policies, registry=registry, id="quota", optional=True)(quota_changed)
    kopf.timer(*policies, interval=interval_s, idle=interval_s, registry=registry)(quota_changed)
    for plural in ("inferencepools", "llmmodels"):
        kopf.on.event(GROUP, VERSION, plural, registry=registry)(pool_event)
    kopf.on.event("", "v1", "namespaces", registry=registry)(pool_event)
    operations: list[Literal["CREATE", "UPDATE"]] = ["CREATE", "UPDATE"]
    kopf.on.validate(
        GROUP, VERSION, "inferencepools", id="quota-pools", operations=operations, registry=registry
    )(validate_pool)
    kopf.on.validate(
        GROUP, VERSION, "llmmodels", id="quota-models", operations=operations, registry=registry
    )(validate_model)
    return registry

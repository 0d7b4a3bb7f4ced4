"""Quota verdicts: would this InferencePool or LLMModel stay within the namespace's policies?

Pure functions over parsed policies (`Effective`, the strictest merge of the policies that
select the namespace) and pool demands. Used by three callers: the admission webhook (refuse a
create/update), the QuotaPolicy reconcile (flag pools that a tightened policy now exceeds) and
the pool reconcile (`allowed_replicas`: never scale past quota, even when admission was
bypassed). Every refusal names the namespace or object, the policy, the limit and the numbers,
e.g. "namespace team-a would use 6 GPUs; QuotaPolicy gpu-standard allows 4".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llmos_operator.quota.policy import Effective
from llmos_operator.quota.usage import PoolDemand, Usage, namespace_usage


@dataclass(frozen=True)
class Verdict:
    """The outcome of a quota check; `violations` are the human-readable refusals."""

    violations: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return not self.violations

    @property
    def message(self) -> str:
        return "; ".join(self.violations)


def usage_violations(namespace: str, usage: Usage, effective: Effective) -> list[str]:
    """Every namespace-level limit `usage` exceeds, strictest policy named."""
    out: list[str] = []
    limits = effective.limits
    if (b := limits.get("gpus")) is not None and usage.gpus > b.value:
        out.append(
            f"namespace {namespace} would use {usage.gpus} GPUs; "
            f"QuotaPolicy {b.policy} allows {b.value}"
        )
    if (b := limits.get("inferencePools")) is not None and usage.inference_pools > b.value:
        out.append(
            f"namespace {namespace} would have {usage.inference_pools} InferencePools; "
            f"QuotaPolicy {b.policy} allows {b.value}"
        )
    if (b := limits.get("totalReplicas")) is not None and usage.total_replicas > b.value:
        out.append(
            f"namespace {namespace} would run {usage.total_replicas} replicas in total; "
            f"QuotaPolicy {b.policy} allows {b.value}"
        )
    return out


def pool_violations(demand: PoolDemand, effective: Effective) -> list[str]:
    """Limits that apply to the pool alone (replicas per pool)."""
    b = effective.limits.get("replicasPerPool")
    if b is not None and demand.peak_replicas > b.value:
        return [
            f"InferencePool {demand.namespace}/{demand.name} asks for up to "
            f"{demand.peak_replicas} replicas; QuotaPolicy {b.policy} allows {b.value} per pool"
        ]
    return []


def model_size_violations(model: str, size_bytes: int | None, effective: Effective) -> list[str]:
    b = effective.limits.get("maxModelSizeBytes")
    if b is None or size_bytes is None or size_bytes <= b.value:
        return []
    return [f"model {model} is {size_bytes} bytes; QuotaPolicy {b.policy} allows {b.value} bytes"]


def check_pool(
    proposed: Mapping[str, Any],
    effective: Effective,
    others: Iterable[PoolDemand],
    *,
    model_size_bytes: int | None = None,
) -> Verdict:
    """Admission of a pool create/update: `others` are the namespace's OTHER pools' demands
    (a pool of the same name is replaced by `proposed`, so an update is not counted twice)."""
    demand = PoolDemand.from_body(proposed)
    rest = [d for d in others if d.name != demand.name]
    usage = namespace_usage(rest).plus(demand)
    violations = pool_violations(demand, effective)
    violations += usage_violations(demand.namespace, usage, effective)
    violations += model_size_violations(demand.model, model_size_bytes, effective)
    return Verdict(tuple(violations))


def check_model(proposed: Mapping[str, Any], effective: Effective) -> Verdict:
    """Admission of an LLMModel create/update: its source and each adapter's source must match
    every policy's patterns; its size, once known (status.sizeBytes), must fit
    maxModelSizeBytes."""
    meta = proposed.get("metadata") or {}
    spec = proposed.get("spec") or {}
    status = proposed.get("status") or {}
    name = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    violations: list[str] = []
    source = spec.get("source")
    if isinstance(source, str) and (why := effective.source_refusal(source)) is not None:
        violations.append(f"LLMModel {name}: {why}")
    adapters = spec.get("adapters")
    for i, adapter in enumerate(adapters if isinstance(adapters, list) else []):
        source = adapter.get("source") if isinstance(adapter, Mapping) else None
        if isinstance(source, str) and (why := effective.source_refusal(source)) is not None:
            violations.append(f"LLMModel {name} spec.adapters[{i}]: {why}")
    size = status.get("sizeBytes")
    if isinstance(size, int) and not isinstance(size, bool):
        violations += model_size_violations(name, size, effective)
    return Verdict(tuple(violations))


def allowed_replicas(
    pool: Mapping[str, Any],
    policies: Effective,
    usage: Usage,
    *,
    current: int = 0,
) -> tuple[int, str | None]:
    """How many replicas the pool may run now, and why it is fewer than asked (None if not).

    `usage` is what the namespace's OTHER pools hold (granted or running); `current` the
    replicas this pool runs now. The answer is the largest count <= spec.replicas that keeps
    every limit, but never below `current` capped at spec.replicas: a pool over a tightened
    quota keeps its existing replicas and gets no new ones.
    """
    demand = PoolDemand.from_body(pool)
    wanted = demand.replicas
    # why: violations only grow with the replica count, so bisect for the largest fitting one
    lo, hi = 0, wanted  # invariant: every count > hi violates or exceeds the ask
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _violations_at(demand, mid, usage, policies):
            hi = mid - 1
        else:
            lo = mid
    fit = lo  # 0 also when even zero replicas break a limit (e.g. one pool too many)
    granted = min(wanted, max(fit, current))
    if fit >= wanted:
        return wanted, None
    reasons = _violations_at(demand, wanted, usage, policies)
    return granted, "; ".join(reasons)


def _violations_at(
    demand: PoolDemand, replicas: int, usage: Usage, effective: Effective
) -> list[str]:
    at = PoolDemand(
        namespace=demand.namespace,
        name=demand.name,
        replicas=replicas,
        gpus_per_replica=demand.gpus_per_replica,
        peak_replicas=replicas,  # why: only what would run now counts when granting
        model=demand.model,
        canary_replicas=demand.canary_replicas,
    )
    return pool_violations(at, effective) + usage_violations(
        demand.namespace, usage.plus(at), effective
    )

"""What InferencePools consume, per pool and per namespace, in the units QuotaPolicy limits.

A pool's demand is read from its body: `spec.replicas` replicas of `spec.resources.gpus` GPUs
each; its per-pool peak is the larger of `spec.replicas` and, when autoscaling is enabled,
`spec.autoscaling.maxReplicas` (the autoscaler may go there without another admission). A
`spec.canary` adds its replicas (each with the same resources) to the GPUs and the total. A
namespace's usage sums its pools. Bodies are plain dicts, as kopf and the API server deliver.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


def _count(value: Any, default: int) -> int:
    """A non-negative int from a spec field; absent or malformed counts as `default`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return default
    return value


@dataclass(frozen=True)
class PoolDemand:
    """One pool's claim on quota."""

    namespace: str
    name: str
    replicas: int
    gpus_per_replica: int
    peak_replicas: int  # the most replicas this spec may run (autoscaling included)
    model: str
    canary_replicas: int = 0  # spec.canary.replicas: worker pods beside the stable ones

    @property
    def gpus(self) -> int:
        return (self.replicas + self.canary_replicas) * self.gpus_per_replica

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, replicas: int | None = None) -> PoolDemand:
        """The demand of a pool body; `replicas` overrides spec.replicas (e.g. a granted count)."""
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        resources = spec.get("resources") or {}
        autoscaling = spec.get("autoscaling") or {}
        wanted = _count(spec.get("replicas"), 1) if replicas is None else replicas
        peak = wanted
        if autoscaling.get("enabled"):
            peak = max(peak, _count(autoscaling.get("maxReplicas"), 0))
        ref = spec.get("modelRef")
        model = ref.get("name", "") if isinstance(ref, Mapping) else str(ref or "")
        canary = spec.get("canary")
        canary_replicas = _count(canary.get("replicas"), 1) if isinstance(canary, Mapping) else 0
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            replicas=wanted,
            gpus_per_replica=_count(resources.get("gpus"), 0),
            peak_replicas=peak,
            model=model,
            canary_replicas=canary_replicas,
        )


@dataclass(frozen=True)
class Usage:
    """A namespace's consumption: the sums QuotaPolicy limits apply to."""

    gpus: int = 0
    inference_pools: int = 0
    total_replicas: int = 0
    max_replicas_per_pool: int = 0

    def plus(self, demand: PoolDemand) -> Usage:
        return Usage(
            gpus=self.gpus + demand.gpus,
            inference_pools=self.inference_pools + 1,
            total_replicas=self.total_replicas + demand.replicas + demand.canary_replicas,
            max_replicas_per_pool=max(self.max_replicas_per_pool, demand.peak_replicas),
        )

    def to_status(self, namespace: str) -> dict[str, Any]:
        """One entry of QuotaPolicy.status.usage (api.quotapolicy.NamespaceUsage, camelCase)."""
        return {
            "namespace": namespace,
            "gpus": self.gpus,
            "inferencePools": self.inference_pools,
            "totalReplicas": self.total_replicas,
        }


def namespace_usage(demands: Iterable[PoolDemand]) -> Usage:
    usage = Usage()
    for demand in demands:
        usage = usage.plus(demand)
    return usage


def usage_by_namespace(demands: Iterable[PoolDemand]) -> dict[str, Usage]:
    out: dict[str, Usage] = {}
    for demand in demands:
        out[demand.namespace] = out.get(demand.namespace, Usage()).plus(demand)
    return out

"""Pure builder of the autoscaling/v2 HorizontalPodAutoscaler for an InferencePool in mode `hpa`.

The HPA scales the pool through its `scale` subresource (scaleTargetRef = the InferencePool, so
the pool handler keeps owning the Deployment) on the same engine signal the builtin autoscaler
uses, as a `Pods` metric with an `AverageValue` target. NOTE: the Kubernetes metrics pipeline does
not know `llmos_*` series by itself: a custom-metrics adapter must serve them under
`custom.metrics.k8s.io` — e.g. prometheus-adapter with the rule in
`manifests/monitoring/prometheus-adapter-rules.yaml` (seriesQuery `llmos_kv_cache_usage_perc`,
metricsQuery averaged per pod). Without it the HPA reports `FailedGetPodsMetric` and holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from llmos_operator.autoscaling.scrape import series_for

POOL_API_VERSION = "llmos.dev/v1alpha1"
POOL_KIND = "InferencePool"


def format_quantity(value: float) -> str:
    """A non-negative number as a Kubernetes quantity: "4", "700m" (milli, rounded up)."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"autoscaling.target must be a non-negative number, got {value}")
    if float(value).is_integer():
        return str(int(value))
    return f"{math.ceil(value * 1000 - 1e-9)}m"


def _window(seconds: float) -> int:
    # why: the HPA API accepts 0..3600 seconds
    return min(max(math.ceil(seconds), 0), 3600)


def hpa_name(pool_name: str) -> str:
    """Deterministic child name: the HPA is named after its pool."""
    return pool_name


def build_hpa(
    *,
    pool_name: str,
    namespace: str,
    metric: str,
    target: float,
    min_replicas: int,
    max_replicas: int,
    scale_up_window_s: float = 0,
    scale_down_window_s: float = 300,
    labels: Mapping[str, str] | None = None,
    owner_uid: str | None = None,
) -> dict[str, Any]:
    """The HPA manifest; `owner_uid` adds the owner reference to the pool (garbage collection)."""
    metadata: dict[str, Any] = {
        "name": hpa_name(pool_name),
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/name": "llmos-worker",
            "app.kubernetes.io/instance": pool_name,
            "app.kubernetes.io/component": "autoscaler",
            "app.kubernetes.io/managed-by": "llmos-operator",
            **dict(labels or {}),
        },
    }
    if owner_uid is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": POOL_API_VERSION,
                "kind": POOL_KIND,
                "name": pool_name,
                "uid": owner_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata,
        "spec": {
            "scaleTargetRef": {
                "apiVersion": POOL_API_VERSION,
                "kind": POOL_KIND,
                "name": pool_name,
            },
            # why: minReplicas 0 needs the HPAScaleToZero alpha gate; stable HPAs start at 1
            "minReplicas": max(min_replicas, 1),
            "maxReplicas": max(max_replicas, 1),
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": series_for(metric)},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": format_quantity(target),
                        },
                    },
                }
            ],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": _window(scale_up_window_s)},
                "scaleDown": {"stabilizationWindowSeconds": _window(scale_down_window_s)},
            },
        },
    }

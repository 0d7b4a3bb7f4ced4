"""NetworkPolicies: workers take calls only from what `access` names; loaders only fetch.

Worker pods (selected by the pool's selector labels) accept ingress on the serving port from:
the peers in `spec.access` (each namespace selector, optionally narrowed by each pod selector), or
the pool's own namespace when `access` names none, and the operator's pods (readiness). On the
metrics port, which serves `/metrics` without an API key, only from the operator's pods (the
autoscaler's scraping) and the monitoring namespace (Prometheus). Egress is DNS only: a worker
never calls out. Loader Job pods accept no ingress and may reach DNS and port 443 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmos_operator.api.common import LabelSelector
from llmos_operator.api.inferencepool import PoolAccess

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server


@dataclass(frozen=True)
class ClusterPeers:
    """Where the operator and the monitoring stack run (from the operator's settings)."""

    operator_namespace: str = "llmos-system"
    operator_pod_labels: tuple[tuple[str, str], ...] = (
        ("app.kubernetes.io/name", "llmos-operator"),
    )
    monitoring_namespace: str | None = "monitoring"


def _selector(sel: LabelSelector) -> dict[str, Any]:
    return sel.model_dump(by_alias=True, exclude_none=True)


def _namespace(name: str) -> dict[str, Any]:
    return {"matchLabels": {NAMESPACE_NAME_LABEL: name}}


def dns_egress() -> dict[str, Any]:
    """Egress to the cluster DNS (any namespace's kube-dns pods) on port 53."""
    return {
        "to": [
            {
                "namespaceSelector": {},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
        ],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }


def access_peers(access: PoolAccess | None) -> list[dict[str, Any]]:
    """The NetworkPolicy peers that `access` allows; the pool's namespace alone when it names none.

    A namespace selector and a pod selector are ANDed in one peer (those pods in those
    namespaces); with pod selectors but no namespace selectors the pods are matched in the pool's
    own namespace, as in Kubernetes.
    """
    namespaces = (access.namespace_selectors or []) if access else []
    pods = (access.pod_selectors or []) if access else []
    if not namespaces and not pods:
        return [{"podSelector": {}}]
    if not namespaces:
        return [{"podSelector": _selector(p)} for p in pods]
    if not pods:
        return [{"namespaceSelector": _selector(n)} for n in namespaces]
    return [
        {"namespaceSelector": _selector(n), "podSelector": _selector(p)}
        for n in namespaces
        for p in pods
    ]


def build_worker_network_policy(
    *,
    name: str,
    namespace: str,
    metadata: dict[str, Any],
    pod_selector: dict[str, str],
    port: int,
    metrics_port: int,
    access: PoolAccess | None,
    peers: ClusterPeers,
) -> dict[str, Any]:
    """The NetworkPolicy of one pool's worker pods. `metadata` carries labels and owner refs."""
    operator = {
        "namespaceSelector": _namespace(peers.operator_namespace),
        "podSelector": {"matchLabels": dict(peers.operator_pod_labels)},
    }
    scrapers: list[dict[str, Any]] = [operator]
    if peers.monitoring_namespace:
        scrapers.append({"namespaceSelector": _namespace(peers.monitoring_namespace)})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {**metadata, "name": name, "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": dict(pod_selector)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [*access_peers(access), operator],
                    "ports": [{"protocol": "TCP", "port": port}],
                },
                {"from": scrapers, "ports": [{"protocol": "TCP", "port": metrics_port}]},
            ],
            "egress": [dns_egress()],
        },
    }


def build_loader_network_policy(
    *, name: str, namespace: str, metadata: dict[str, Any], pod_selector: dict[str, str]
) -> dict[str, Any]:
    """The NetworkPolicy of a model's loader Job pods: no ingress; egress to DNS and 443 only."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {**metadata, "name": name, "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": dict(pod_selector)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [dns_egress(), {"ports": [{"protocol": "TCP", "port": 443}]}],
        },
    }

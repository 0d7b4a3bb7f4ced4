"""NetworkPolicies: workers take calls only from what `access` names; loaders only fetch.

Worker pods (selected by the pool's selector labels) accept ingress on the serving port from:
the peers in `spec.access` (each namespace selector, optionally narrowed by each pod selector), or
the pool's own namespace when `access` names none, and the operator's pods (readiness). On the
metrics port, which serves `/metrics` without an API key, only from the operator's pods (the
autoscaler's scraping) and the monitoring namespace (Prometheus). Egress is DNS only: a worker
never calls out. Loader Job pods accept no ingress and may reach DNS and port 443 only.

A pool with a gateway moves the `access` peers to the gateway's pods: the workers' serving port
then admits only the gateway and the operator (the peers too until a gateway pod is ready and
the pool's Service points at the gateway), and their metrics port also the gateway (it
routes on the workers' load). The gateway pods take calls on their serving port from the
`access` peers and the operator, and may reach DNS, the pool's worker pods (serving and metrics
ports) and the Kubernetes API (TCP 443 and 6443 to any address: the API server is no pod a
selector could name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmos_operator.api.common import LabelSelector
from llmos_operator.api.inferencepool import PoolAccess

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server
KUBE_API_PORTS = (443, 6443)  # why: the kubernetes Service's port and the API server's usual one


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
    gateway_pods: dict[str, str] | None = None,
    direct_access: bool = False,
) -> dict[str, Any]:
    """The NetworkPolicy of one pool's worker pods. `metadata` carries labels and owner refs.

    With `gateway_pods` (the labels of the pool's gateway pods, same namespace) the serving port
    admits the gateway instead of the `access` peers (and besides them with `direct_access`,
    while the pool's Service still points at the workers), and the metrics port admits it too.
    """
    operator = _operator(peers)
    scrapers = _scrapers(peers)
    callers = access_peers(access)
    if gateway_pods is not None:
        gateway = {"podSelector": {"matchLabels": dict(gateway_pods)}}
        callers = [gateway, *callers] if direct_access else [gateway]
        scrapers.append(gateway)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {**metadata, "name": name, "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": dict(pod_selector)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [*callers, operator],
                    "ports": [{"protocol": "TCP", "port": port}],
                },
                {"from": scrapers, "ports": [{"protocol": "TCP", "port": metrics_port}]},
            ],
            "egress": [dns_egress()],
        },
    }


def _scrapers(peers: ClusterPeers) -> list[dict[str, Any]]:
    """Who may read a metrics port: the operator, and the monitoring namespace when set."""
    scrapers = [_operator(peers)]
    if peers.monitoring_namespace:
        scrapers.append({"namespaceSelector": _namespace(peers.monitoring_namespace)})
    return scrapers


def _operator(peers: ClusterPeers) -> dict[str, Any]:
    return {
        "namespaceSelector": _namespace(peers.operator_namespace),
        "podSelector": {"matchLabels": dict(peers.operator_pod_labels)},
    }


def build_gateway_network_policy(
    *,
    name: str,
    namespace: str,
    metadata: dict[str, Any],
    pod_selector: dict[str, str],
    worker_pods: dict[str, str],
    port: int,
    metrics_port: int,
    worker_port: int,
    worker_metrics_port: int,
    access: PoolAccess | None,
    peers: ClusterPeers,
) -> dict[str, Any]:
    """The NetworkPolicy of one pool's gateway pods: in from `access` and the operator, its
    metrics port from the operator and monitoring; out to DNS, the pool's workers and the
    Kubernetes API."""
    scrapers = _scrapers(peers)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {**metadata, "name": name, "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": dict(pod_selector)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [*access_peers(access), _operator(peers)],
                    "ports": [{"protocol": "TCP", "port": port}],
                },
                {"from": scrapers, "ports": [{"protocol": "TCP", "port": metrics_port}]},
            ],
            "egress": [
                dns_egress(),
                {
                    "to": [{"podSelector": {"matchLabels": dict(worker_pods)}}],
                    "ports": [
                        {"protocol": "TCP", "port": worker_port},
                        {"protocol": "TCP", "port": worker_metrics_port},
                    ],
                },
                {"ports": [{"protocol": "TCP", "port": p} for p in KUBE_API_PORTS]},
            ],
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

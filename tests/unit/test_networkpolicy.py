"""NetworkPolicies: schema-valid, and exactly the peers a pool's `access` allows (table-driven)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from llmos_operator.api.inferencepool import PoolAccess
from llmos_operator.builders.networkpolicy import (
    ClusterPeers,
    build_loader_network_policy,
    build_worker_network_policy,
)

K8S_VERSION = "1.33"
PEERS = ClusterPeers(operator_namespace="llmos-system", monitoring_namespace="monitoring")
OPERATOR_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llmos-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "llmos-operator"}},
}
MONITORING_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
}
TEAM_A = {"matchLabels": {"team": "a"}}
CLIENTS = {"matchLabels": {"role": "client"}}
GATEWAY = {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gw"]}]}


def worker_policy(access: dict[str, Any] | None, peers: ClusterPeers = PEERS) -> dict[str, Any]:
    return build_worker_network_policy(
        name="chat",
        namespace="team-a",
        metadata={"labels": {"app.kubernetes.io/instance": "chat"}},
        pod_selector={"app.kubernetes.io/instance": "chat"},
        port=8000,
        metrics_port=9090,
        access=PoolAccess.model_validate(access) if access is not None else None,
        peers=peers,
    )


@pytest.mark.parametrize(
    ("access", "expected_access_peers"),
    [
        (None, [{"podSelector": {}}]),
        ({}, [{"podSelector": {}}]),
        ({"namespaceSelectors": [TEAM_A]}, [{"namespaceSelector": TEAM_A}]),
        ({"podSelectors": [CLIENTS]}, [{"podSelector": CLIENTS}]),
        (
            {"namespaceSelectors": [TEAM_A], "podSelectors": [CLIENTS, GATEWAY]},
            [
                {"namespaceSelector": TEAM_A, "podSelector": CLIENTS},
                {"namespaceSelector": TEAM_A, "podSelector": GATEWAY},
            ],
        ),
        (
            {"namespaceSelectors": [TEAM_A, {}]},
            [{"namespaceSelector": TEAM_A}, {"namespaceSelector": {}}],
        ),
    ],
)
def test_worker_ingress_allows_exactly_the_access_peers(
    access: dict[str, Any] | None, expected_access_peers: list[dict[str, Any]]
) -> None:
    policy = worker_policy(access)
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/instance": "chat"}}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    api, metrics = spec["ingress"]
    assert api["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert api["from"] == [*expected_access_peers, OPERATOR_PEER]
    # /metrics answers without an API key, so only the scrapers reach its port
    assert metrics["ports"] == [{"protocol": "TCP", "port": 9090}]
    assert metrics["from"] == [OPERATOR_PEER, MONITORING_PEER]


def test_no_monitoring_namespace_means_no_monitoring_peer() -> None:
    policy = worker_policy(None, ClusterPeers(monitoring_namespace=None))
    for rule in policy["spec"]["ingress"]:
        assert MONITORING_PEER not in rule["from"]


def test_worker_egress_is_dns_only() -> None:
    [dns] = worker_policy(None)["spec"]["egress"]
    assert dns["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    assert dns["to"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
    ]


def test_loader_policy_allows_dns_and_https_out_and_nothing_in() -> None:
    policy = build_loader_network_policy(
        name="m-loader", namespace="team-a", metadata={}, pod_selector={"llmos.dev/model": "m"}
    )
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    spec = policy["spec"]
    assert spec["ingress"] == []
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    ports = [p for rule in spec["egress"] for p in rule["ports"]]
    assert ports == [
        {"protocol": "UDP", "port": 53},
        {"protocol": "TCP", "port": 53},
        {"protocol": "TCP", "port": 443},
    ]

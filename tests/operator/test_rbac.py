"""RBAC from evidence: every request the operator made is allowed by the ClusterRole in
manifests/base, and the ClusterRole grants nothing the operator was never seen to use, except
what it holds only to grant it to the pools' gateways (RBAC refuses a Role granting more than its
creator holds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmos_operator.builders.gateway import build_gateway_role
from llmos_operator.builders.pool import PoolRef
from tests.operator.conftest import Cluster, OperatorProcess
from tests.operator.flows import finish_loader, mark_deployment_ready, model_status, sample
from tests.operator.test_inferencepool import wait_children

ROOT = Path(__file__).resolve().parents[2]
Triple = tuple[str, str, str]


def rule_grants(role: dict[str, Any]) -> set[Triple]:
    grants: set[Triple] = set()
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], "no wildcards"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants |= {(group, resource, verb) for verb in rule["verbs"]}
    return grants


def cluster_role_grants() -> set[Triple]:
    return rule_grants(
        yaml.safe_load((ROOT / "manifests" / "base" / "clusterrole.yaml").read_text())
    )


def gateway_grants() -> set[Triple]:
    """What every pool's gateway Role grants (the operator must hold it to create the Role)."""
    role = build_gateway_role(PoolRef("chat", "team-a", "uid"))
    assert all(set(rule) <= {"apiGroups", "resources", "resourceNames", "verbs"}
               for rule in role["rules"])  # fmt: skip
    return rule_grants(role)


def test_the_operator_holds_what_it_grants_the_gateways() -> None:
    assert gateway_grants() - cluster_role_grants() == set()


async def tamper(cluster: Cluster, objects: list[tuple[str, str]]) -> None:
    """Hand-edit a label of each object and wait until the operator has put it back."""
    label = "app.kubernetes.io/part-of"
    for plural, name in objects:
        await cluster.patch(plural, name, {"metadata": {"labels": {label: "tampered"}}})
    for plural, name in objects:

        async def restored(plural: str = plural, name: str = name) -> bool:
            obj = await cluster.get(plural, name) or {}
            return obj.get("metadata", {}).get("labels", {}).get(label) == "llmos"

        await cluster.wait_for(restored, what=f"{plural}/{name} restored")


async def test_cluster_role_matches_what_the_operator_does(
    cluster: Cluster, operator: OperatorProcess, operator_evidence: set[Triple]
) -> None:
    # the whole life of a model and a pool, with every kind of child tampered with on the way
    await cluster.create("llmmodels", sample("LLMModel"))

    async def job() -> str | None:
        name = (await model_status(cluster, "smollm2")).get("loadJob")
        return name if name in cluster.names("jobs") else None

    job_name = await cluster.wait_for(job, what="loader Job")
    await tamper(cluster, [("jobs", job_name), ("persistentvolumeclaims", "smollm2-weights")])
    await finish_loader(cluster, "smollm2")

    async def model_ready() -> bool:
        return (await model_status(cluster, "smollm2")).get("phase") == "Ready"

    await cluster.wait_for(model_ready, what="model Ready")
    await cluster.create("inferencepools", sample("InferencePool"))
    await wait_children(cluster)
    await mark_deployment_ready(cluster, "chat", 2)
    await tamper(
        cluster,
        [
            ("serviceaccounts", "chat-worker"),
            ("deployments", "chat"),
            ("services", "chat"),
            ("poddisruptionbudgets", "chat"),
            ("networkpolicies", "chat-worker"),
            ("services", "chat-workers"),
            ("serviceaccounts", "chat-gateway"),
            ("roles", "chat-gateway"),
            ("rolebindings", "chat-gateway"),
            ("deployments", "chat-gateway"),
            ("networkpolicies", "chat-gateway"),
        ],
    )
    await cluster.delete("services", "chat")

    async def restored() -> bool:
        return await cluster.get("services", "chat") is not None

    await cluster.wait_for(restored, what="service restored")
    await cluster.delete("inferencepools", "chat")
    await cluster.delete("llmmodels", "smollm2")

    async def gone() -> bool:
        return not cluster.names("deployments") and not cluster.names("persistentvolumeclaims")

    await cluster.wait_for(gone, what="cleanup")
    await operator.stop()

    used = set(cluster.server.evidence)
    grants = cluster_role_grants()
    assert used, "no evidence recorded"
    assert used - grants == set(), "the operator made requests its ClusterRole does not allow"
    # why: other operator tests of this session (quota, autoscaling) add their evidence
    unused = grants - used - operator_evidence - gateway_grants()
    assert unused == set(), "the ClusterRole grants what the operator never used"

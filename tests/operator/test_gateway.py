"""The gateway and the canary against the emulated API server: a pool gets its gateway (RBAC,
Deployment, the client Service pointed at it, the workers' Service), a canary added to the spec
gets its Deployment and Service and is removed with it, and turning the gateway off gives the
pool back its direct Service."""

from __future__ import annotations

from typing import Any

from tests.operator.conftest import Cluster, OperatorProcess
from tests.operator.flows import (
    finish_loader,
    mark_deployment_ready,
    model_status,
    pool_condition,
    ready_model,
    sample,
)
from tests.operator.test_inferencepool import wait_children

GATEWAY_LABELS = {"app.kubernetes.io/name": "llmos-gateway", "app.kubernetes.io/instance": "chat"}
STABLE_LABELS = {"app.kubernetes.io/name": "llmos-worker", "app.kubernetes.io/instance": "chat"}
OPERATOR = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llmos-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "llmos-operator"}},
}
CANARY = {"modelRef": "smollm2-next", "weight": 20, "replicas": 1}


def gateway_env(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


async def second_model(cluster: Cluster) -> None:
    body = sample("LLMModel")
    body["metadata"]["name"] = "smollm2-next"
    body["spec"]["version"] = "0.2.0"
    await cluster.create("llmmodels", body)
    await finish_loader(cluster, "smollm2-next")

    async def ready() -> bool:
        return (await model_status(cluster, "smollm2-next")).get("phase") == "Ready"

    await cluster.wait_for(ready, what="canary model Ready")


async def test_pool_gets_its_gateway_and_canary(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await ready_model(cluster)
    body = sample("InferencePool")
    body["spec"]["routing"] = {"strategy": "least-load", "idleScaleToZeroSeconds": 300}
    pool = await cluster.create("inferencepools", body)
    await wait_children(cluster)

    gateway = await cluster.get("deployments", "chat-gateway")
    assert gateway is not None
    [owner] = gateway["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("InferencePool", pool["metadata"]["uid"])
    env = gateway_env(gateway)
    assert env["LLMOS_GATEWAY_STRATEGY"] == "least-load"
    assert env["LLMOS_GATEWAY_IDLE_SCALE_TO_ZERO"] == "300"
    assert env["LLMOS_GATEWAY_POOL_NAME"] == "chat"
    assert env["LLMOS_GATEWAY_DISCOVER"] == "stable=chat-workers"
    assert "LLMOS_GATEWAY_CANARY_WEIGHT" not in env
    assert gateway["spec"]["template"]["spec"]["serviceAccountName"] == "chat-gateway"
    for plural in ("serviceaccounts", "roles", "rolebindings", "networkpolicies"):
        assert "chat-gateway" in cluster.names(plural), plural
    role = await cluster.get("roles", "chat-gateway")
    assert role is not None
    assert {r["resources"][0] for r in role["rules"]} == {"endpointslices", "inferencepools"}
    binding = await cluster.get("rolebindings", "chat-gateway")
    assert binding is not None and binding["subjects"][0]["name"] == "chat-gateway"
    # the workers have their own Service; until a gateway pod is ready the client Service
    # (status.endpoint) still selects the workers, and the pool's callers still reach them
    workers = await cluster.get("services", "chat-workers")
    assert workers is not None and workers["spec"]["selector"] == STABLE_LABELS
    front = await cluster.get("services", "chat")
    assert front is not None and front["spec"]["selector"] == STABLE_LABELS

    async def gateway_waiting() -> dict[str, Any]:
        return await pool_condition(cluster, "chat", "GatewayReady")

    cond = await cluster.wait_for(gateway_waiting, what="GatewayReady reported")
    assert cond["status"] == "False" and cond["reason"] == "ReplicasNotReady"
    policy = await cluster.get("networkpolicies", "chat-worker")
    assert policy is not None
    gateway_peer = {"podSelector": {"matchLabels": GATEWAY_LABELS}}
    assert policy["spec"]["ingress"][0]["from"] == [gateway_peer, {"podSelector": {}}, OPERATOR]
    await mark_deployment_ready(cluster, "chat-gateway", 1)

    async def gateway_ready() -> dict[str, Any] | None:
        cond = await pool_condition(cluster, "chat", "GatewayReady")
        return cond if cond.get("status") == "True" else None

    await cluster.wait_for(gateway_ready, what="GatewayReady")

    async def fronted() -> dict[str, Any] | None:
        front = await cluster.get("services", "chat") or {}
        policy = await cluster.get("networkpolicies", "chat-worker") or {}
        moved = front.get("spec", {}).get("selector") == GATEWAY_LABELS
        return policy if moved else None

    # a gateway pod is ready: the client Service fronts it, the workers admit only it
    policy = await cluster.wait_for(fronted, what="Service on the gateway")
    assert policy["spec"]["ingress"][0]["from"] == [gateway_peer, OPERATOR]

    # a canary: its Deployment and Service appear once its model is Ready, the gateway splits
    await second_model(cluster)
    await cluster.patch("inferencepools", "chat", {"spec": {"canary": CANARY}})

    async def canary() -> dict[str, Any] | None:
        return await cluster.get("deployments", "chat-canary")

    dep = await cluster.wait_for(canary, what="canary Deployment")
    assert dep["spec"]["replicas"] == 1
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["llmos.dev/version"] == "canary" and labels["llmos.dev/model"] == "smollm2-next"
    canary_service = await cluster.get("services", "chat-canary-workers")
    assert canary_service is not None
    assert canary_service["spec"]["selector"].items() <= labels.items()
    # a drain evicts one canary pod at a time, and the stable budget does not count them
    budget = await cluster.get("poddisruptionbudgets", "chat-canary")
    assert budget is not None and budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    stable_budget = await cluster.get("poddisruptionbudgets", "chat") or {}
    assert not stable_budget["spec"]["selector"]["matchLabels"].items() <= labels.items()

    async def split() -> dict[str, Any] | None:
        dep = await cluster.get("deployments", "chat-gateway") or {}
        env = gateway_env(dep) if dep else {}
        return env if env.get("LLMOS_GATEWAY_CANARY_WEIGHT") == "20" else None

    env = await cluster.wait_for(split, what="gateway told of the canary")
    assert env["LLMOS_GATEWAY_DISCOVER"] == "stable=chat-workers,canary=chat-canary-workers"
    await mark_deployment_ready(cluster, "chat-canary", 1)

    async def canary_ready() -> dict[str, Any] | None:
        cond = await pool_condition(cluster, "chat", "CanaryReady")
        return cond if cond.get("status") == "True" else None

    cond = await cluster.wait_for(canary_ready, what="CanaryReady")
    assert "smollm2-next" in cond["message"]

    # the canary removed from the spec: its children go, the gateway routes to stable only
    await cluster.patch("inferencepools", "chat", {"spec": {"canary": None}})

    async def canary_gone() -> bool:
        dep = await cluster.get("deployments", "chat-gateway") or {}
        return (
            "chat-canary" not in cluster.names("deployments")
            and "chat-canary-workers" not in cluster.names("services")
            and "chat-canary" not in cluster.names("poddisruptionbudgets")
            and bool(dep)
            and "LLMOS_GATEWAY_CANARY_WEIGHT" not in gateway_env(dep)
            and await pool_condition(cluster, "chat", "CanaryReady") == {}
        )

    await cluster.wait_for(canary_gone, what="canary removed")

    # the gateway turned off: its children go and the client Service selects the workers again
    await cluster.patch(
        "inferencepools", "chat", {"spec": {"routing": {"gateway": {"enabled": False}}}}
    )

    async def direct() -> bool:
        front = await cluster.get("services", "chat") or {}
        return (
            front.get("spec", {}).get("selector") == STABLE_LABELS
            and not any(
                "chat-gateway" in cluster.names(plural)
                for plural in ("deployments", "serviceaccounts", "roles", "rolebindings")
            )
            and cluster.names("services") == ["chat"]
        )

    await cluster.wait_for(direct, what="gateway removed")

    async def no_gateway_condition() -> bool:
        return await pool_condition(cluster, "chat", "GatewayReady") == {}

    await cluster.wait_for(no_gateway_condition, what="GatewayReady dropped")
    assert "chat-gateway" not in cluster.names("networkpolicies")

    await cluster.delete("inferencepools", "chat")

    async def cleaned() -> bool:
        return not cluster.names("deployments") and not cluster.names("services")

    await cluster.wait_for(cleaned, what="cleanup")
    assert not operator.errors


async def test_pool_delete_removes_gateway_and_canary(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await ready_model(cluster)
    await second_model(cluster)
    body = sample("InferencePool")
    body["spec"]["canary"] = CANARY
    await cluster.create("inferencepools", body)

    async def all_there() -> bool:
        return {"chat", "chat-gateway", "chat-canary"} <= set(cluster.names("deployments"))

    await cluster.wait_for(all_there, what="stable, canary and gateway Deployments")
    assert {"chat", "chat-workers", "chat-canary-workers"} <= set(cluster.names("services"))
    assert {"chat", "chat-canary"} <= set(cluster.names("poddisruptionbudgets"))
    await cluster.delete("inferencepools", "chat")

    async def cleaned() -> bool:
        plurals = ("deployments", "services", "serviceaccounts", "roles", "rolebindings")
        plurals += ("poddisruptionbudgets",)
        return not any(cluster.names(plural) for plural in plurals)

    await cluster.wait_for(cleaned, what="every child removed")


async def test_a_pool_never_takes_or_deletes_another_pools_children(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    """Pool "chat"'s gateway Deployment is chat-gateway, the name a pool "chat-gateway" gives
    its workers: the second pool reports the clash and leaves the first one's objects alone."""
    await ready_model(cluster)
    chat = await cluster.create("inferencepools", sample("InferencePool"))
    await wait_children(cluster)
    clash = sample("InferencePool")
    clash["metadata"]["name"] = "chat-gateway"
    await cluster.create("inferencepools", clash)

    async def reported() -> dict[str, Any] | None:
        cond = await pool_condition(cluster, "chat-gateway", "Ready")
        return cond if cond.get("reason") == "NameConflict" else None

    cond = await cluster.wait_for(reported, what="NameConflict")
    assert "Deployment chat-gateway" in cond["message"]

    async def owner_uid() -> str:
        dep = await cluster.get("deployments", "chat-gateway") or {}
        return str(dep["metadata"]["ownerReferences"][0]["uid"])

    assert await owner_uid() == chat["metadata"]["uid"]
    assert (
        gateway_env(await cluster.get("deployments", "chat-gateway") or {})[
            "LLMOS_GATEWAY_POOL_NAME"
        ]
        == "chat"
    )
    await cluster.delete("inferencepools", "chat-gateway")

    async def gone() -> bool:
        return await cluster.get("inferencepools", "chat-gateway") is None

    await cluster.wait_for(gone, what="clashing pool deleted")
    assert await owner_uid() == chat["metadata"]["uid"]  # chat's gateway survived the cleanup
    assert "chat-gateway-worker" not in cluster.names("serviceaccounts")

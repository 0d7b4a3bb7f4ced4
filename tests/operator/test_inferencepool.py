"""InferencePool against the emulated API server: waits for its model, renders its children,
follows the Deployment's status, undoes drift, rolls on spec changes, removes fields a spec
change drops, cleans up, survives a restart, and reports invalid specs without creating half a
pool."""

from __future__ import annotations

from typing import Any

from tests.operator.conftest import Cluster, OperatorProcess
from tests.operator.flows import (
    mark_deployment_ready,
    pool_condition,
    ready_model,
    sample,
)

CHILDREN = ("serviceaccounts", "deployments", "services", "poddisruptionbudgets")


def child_names(cluster: Cluster) -> dict[str, list[str]]:
    return {plural: cluster.names(plural) for plural in CHILDREN}


async def wait_children(cluster: Cluster) -> None:
    async def all_there() -> bool:
        # why: the gateway's Deployment is applied last of the pool's children
        return all(cluster.names(plural) for plural in CHILDREN) and any(
            name.endswith("-gateway") for name in cluster.names("deployments")
        )

    await cluster.wait_for(all_there, what="pool children")


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"]}


async def test_pool_lifecycle(cluster: Cluster, operator: OperatorProcess) -> None:
    pool = await cluster.create("inferencepools", sample("InferencePool"))

    async def waiting() -> dict[str, Any]:
        return await pool_condition(cluster, "chat", "Ready")

    cond = await cluster.wait_for(waiting, what="waiting condition")
    assert cond["reason"] == "ModelNotFound" and "spec.modelRef" in cond["message"]
    assert child_names(cluster) == {plural: [] for plural in CHILDREN}

    await ready_model(cluster)
    await wait_children(cluster)
    assert child_names(cluster) == {
        "serviceaccounts": ["chat-gateway", "chat-worker"],
        "deployments": ["chat", "chat-gateway"],
        "services": ["chat", "chat-workers"],
        "poddisruptionbudgets": ["chat", "chat-gateway"],
    }
    for plural in CHILDREN:
        child = await cluster.get(plural, cluster.names(plural)[0])
        assert child is not None
        [owner] = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("InferencePool", pool["metadata"]["uid"])
        assert child["metadata"]["labels"]["app.kubernetes.io/instance"] == "chat"
    deployment = await cluster.get("deployments", "chat")
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 2
    assert env_of(deployment)["LLMOS_MAX_NUM_SEQS"] == "32"

    # the Deployment reports its replicas ready -> the pool is Ready with an endpoint
    await mark_deployment_ready(cluster, "chat", 2)

    async def ready() -> dict[str, Any] | None:
        obj = await cluster.get("inferencepools", "chat") or {}
        status = obj.get("status") or {}
        conds = {c["type"]: c for c in status.get("conditions") or []}
        return status if conds.get("Ready", {}).get("status") == "True" else None

    status = await cluster.wait_for(ready, what="pool Ready")
    assert status["readyReplicas"] == 2 and status["replicas"] == 2
    assert status["endpoint"] == "http://chat.team-a.svc.cluster.local:8000/v1"
    assert (
        status["selector"] == "app.kubernetes.io/instance=chat,app.kubernetes.io/name=llmos-worker"
    )
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Progressing"]["status"] == "False" and conds["Degraded"]["status"] == "False"

    # drift: a hand edit of the Deployment and a deleted Service are undone
    await cluster.patch("deployments", "chat", {"spec": {"replicas": 7}})
    await cluster.delete("services", "chat")

    async def restored() -> bool:
        dep = await cluster.get("deployments", "chat") or {}
        svc = await cluster.get("services", "chat")
        return dep.get("spec", {}).get("replicas") == 2 and svc is not None

    await cluster.wait_for(restored, what="drift corrected")

    # engine settings change -> the Deployment's pod template changes (a rollout)
    before = await cluster.get("deployments", "chat")
    assert before is not None
    await cluster.patch("inferencepools", "chat", {"spec": {"engine": {"maxNumSeqs": 8}}})

    async def rolled() -> dict[str, Any] | None:
        dep = await cluster.get("deployments", "chat") or {}
        return dep if dep and env_of(dep)["LLMOS_MAX_NUM_SEQS"] == "8" else None

    after = await cluster.wait_for(rolled, what="Deployment updated")
    assert after["metadata"]["generation"] > before["metadata"]["generation"]

    async def progressing() -> bool:
        cond = await pool_condition(cluster, "chat", "Progressing")
        return cond.get("status") == "True"

    await cluster.wait_for(progressing, what="Progressing while the rollout runs")

    # delete -> the cleanup path removes every child and then the pool itself
    await cluster.delete("inferencepools", "chat")

    async def cleaned() -> bool:
        pool_gone = await cluster.get("inferencepools", "chat") is None
        return pool_gone and child_names(cluster) == {plural: [] for plural in CHILDREN}

    await cluster.wait_for(cleaned, what="cleanup")


async def test_dropped_spec_fields_leave_the_children(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    """A field the operator wrote and the spec no longer asks for is removed from the child (a
    merge patch alone would leave it); fields others added to the child stay."""
    await ready_model(cluster)
    body = sample("InferencePool")
    body["spec"].setdefault("resources", {})["nodeSelector"] = {"pool": "gpu"}
    await cluster.create("inferencepools", body)

    async def pod_spec() -> dict[str, Any] | None:
        dep = await cluster.get("deployments", "chat")
        return dep["spec"]["template"]["spec"] if dep else None

    first = await cluster.wait_for(pod_spec, what="Deployment")
    assert first["nodeSelector"] == {"pool": "gpu"}
    # another controller annotates the Deployment: not the operator's to remove
    await cluster.patch("deployments", "chat", {"metadata": {"annotations": {"other/x": "1"}}})
    await cluster.patch("inferencepools", "chat", {"spec": {"resources": {"nodeSelector": None}}})

    async def dropped() -> dict[str, Any] | None:
        dep = await cluster.get("deployments", "chat") or {}
        pod = dep.get("spec", {}).get("template", {}).get("spec", {})
        return dep if pod and "nodeSelector" not in pod else None

    dep = await cluster.wait_for(dropped, what="nodeSelector removed from the Deployment")
    assert dep["metadata"]["annotations"]["other/x"] == "1"
    assert dep["spec"]["replicas"] == 2  # the rest is as it was


async def test_restart_mid_way_gives_same_end_state(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await ready_model(cluster)
    await cluster.create("inferencepools", sample("InferencePool"))
    await wait_children(cluster)
    first = {p: [(await cluster.get(p, n) or {})["metadata"]["uid"] for n in cluster.names(p)]
             for p in CHILDREN}  # fmt: skip

    await operator.stop()
    await cluster.patch("inferencepools", "chat", {"spec": {"replicas": 3}})
    await operator.start()

    async def scaled() -> bool:
        dep = await cluster.get("deployments", "chat") or {}
        return dep.get("spec", {}).get("replicas") == 3

    await cluster.wait_for(scaled, what="change made while down is applied")
    second = {p: [(await cluster.get(p, n) or {})["metadata"]["uid"] for n in cluster.names(p)]
              for p in CHILDREN}  # fmt: skip
    assert second == first  # the same objects: nothing duplicated, nothing re-created
    await mark_deployment_ready(cluster, "chat", 3)

    async def ready() -> bool:
        return (await pool_condition(cluster, "chat", "Ready")).get("status") == "True"

    await cluster.wait_for(ready, what="pool Ready after restart")


async def test_invalid_pool_is_reported_and_never_half_created(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await ready_model(cluster)
    # the emulator, like a server without the CRD schema, lets these through to the operator
    hostile = [
        ("neg", {"replicas": -1}, "spec.replicas"),
        ("quantity", {"resources": {"memory": "12 parsecs"}}, "spec.resources.memory"),
        ("unknown", {"engine": {"warpDrive": True}}, "spec.engine.warpDrive"),
        ("long", {"modelRef": "m" * 400}, "spec.modelRef"),
    ]
    for name, patch, _ in hostile:
        body = sample("InferencePool")
        body["metadata"]["name"] = name
        body["spec"].update(patch)
        await cluster.create("inferencepools", body)
    good = sample("InferencePool")
    good["metadata"]["name"] = "good"
    await cluster.create("inferencepools", good)

    for name, _, field in hostile:

        async def reported(name: str = name) -> dict[str, Any]:
            return await pool_condition(cluster, name, "Ready")

        cond = await cluster.wait_for(reported, what=f"{name} reported")
        assert cond["reason"] == "InvalidSpec" and cond["message"].startswith(field), cond

    await wait_children(cluster)  # the operator carries on with the valid pool
    assert child_names(cluster) == {
        "serviceaccounts": ["good-gateway", "good-worker"],
        "deployments": ["good", "good-gateway"],
        "services": ["good", "good-workers"],
        "poddisruptionbudgets": ["good", "good-gateway"],
    }
    unknown_model = sample("InferencePool")
    unknown_model["metadata"]["name"] = "orphan"
    unknown_model["spec"]["modelRef"] = "no-such-model"
    await cluster.create("inferencepools", unknown_model)

    async def not_found() -> dict[str, Any]:
        return await pool_condition(cluster, "orphan", "Ready")

    cond = await cluster.wait_for(not_found, what="unknown model reported")
    assert cond["reason"] == "ModelNotFound" and "no-such-model" in cond["message"]
    assert "orphan" not in cluster.names("deployments")
    assert not operator.errors

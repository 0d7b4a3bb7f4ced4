"""A pool's canary workers count against its QuotaPolicy like its stable ones (same resources)."""

from __future__ import annotations

from typing import Any

from llmos_operator.quota import (
    Effective,
    Policy,
    PoolDemand,
    allowed_replicas,
    check_pool,
    namespace_usage,
)


def policy(**limits: int) -> Policy:
    return Policy.from_body({"metadata": {"name": "p"}, "spec": {"limits": limits}})


def pool(replicas: int, gpus: int, canary: int | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"modelRef": "m", "replicas": replicas, "resources": {"gpus": gpus}}
    if canary is not None:
        spec["canary"] = {"modelRef": "m-next", "weight": 10, "replicas": canary}
    return {"metadata": {"name": "chat", "namespace": "team-a"}, "spec": spec}


def test_canary_replicas_add_gpus_and_replicas() -> None:
    demand = PoolDemand.from_body(pool(3, 2, 2))
    assert (demand.replicas, demand.canary_replicas, demand.gpus) == (3, 2, 10)
    usage = namespace_usage([demand])
    assert (usage.gpus, usage.total_replicas) == (10, 5)
    assert PoolDemand.from_body(pool(3, 2, None)).gpus == 6
    # spec.canary.replicas defaults to 1
    body = pool(1, 1, None)
    body["spec"]["canary"] = {"modelRef": "m-next", "weight": 5}
    assert PoolDemand.from_body(body).gpus == 2


def test_admission_and_the_replica_gate_leave_room_for_the_canary() -> None:
    eff = Effective.merge([policy(gpus=4)])
    assert check_pool(pool(3, 1, None), eff, []).allowed
    denied = check_pool(pool(3, 1, 2), eff, [])
    assert denied.message == "namespace team-a would use 5 GPUs; QuotaPolicy p allows 4"
    # the gate grants the stable workers what the canary leaves
    assert allowed_replicas(pool(4, 1, 1), eff, namespace_usage([]))[0] == 3
    eff = Effective.merge([policy(totalReplicas=4)])
    assert allowed_replicas(pool(4, 0, 2), eff, namespace_usage([]))[0] == 2

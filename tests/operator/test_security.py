"""Security children against the emulator: NetworkPolicies, encrypted models, key rotation.

An encrypted LLMModel's loader Job gets the key Secret and `--encrypt-key-file`; once Ready, the
model records the key in status and its pools' workers get the same key file plus the digest.
Changing `spec.encryption.keySecretRef` runs a rotation Job; status (and so every pool) moves
to the new key only when that Job has succeeded. Each model and pool gets its NetworkPolicy.
"""

from __future__ import annotations

from typing import Any

from tests.operator.conftest import Cluster, OperatorProcess
from tests.operator.flows import DIGEST, finish_loader, model_status, sample

OLD = {"name": "kek-2024", "key": "kek"}
NEW = {"name": "kek-2025", "key": "kek"}


def worker(deployment: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    return pod["containers"][0]["args"], volumes


async def test_encrypted_model_network_policies_and_key_rotation(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    model = sample("LLMModel")
    model["spec"]["encryption"] = {"enabled": True, "keySecretRef": OLD}
    await cluster.create("llmmodels", model)
    job_name = await finish_loader(cluster, "smollm2")
    job = await cluster.get("jobs", job_name)
    assert job is not None
    assert "--encrypt-key-file" in job["spec"]["template"]["spec"]["containers"][0]["args"]

    async def ready() -> dict[str, Any] | None:
        status = await model_status(cluster, "smollm2")
        return status if status.get("phase") == "Ready" else None

    status = await cluster.wait_for(ready, what="model Ready")
    assert status["keySecretRef"] == OLD
    assert await cluster.get("networkpolicies", "smollm2-loader") is not None

    await cluster.create("inferencepools", sample("InferencePool"))
    deployment = await cluster.wait_for(lambda: cluster.get("deployments", "chat"), what="pool")
    args, volumes = worker(deployment)
    assert args[args.index("--model-digest") + 1] == DIGEST
    assert "--model-key-file" in args
    assert volumes["model-key"]["secret"]["secretName"] == OLD["name"]
    assert volumes["ratelimits"]["configMap"]["name"] == "chat-ratelimits"
    policy = await cluster.wait_for(
        lambda: cluster.get("networkpolicies", "chat-worker"), what="pool NetworkPolicy"
    )
    # the policy guards the Deployment's pods (and a canary's: it selects by pool, not instance)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "InferencePool"
    # drift: a hand-opened policy is closed again by the next reconcile
    await cluster.patch("networkpolicies", "chat-worker", {"spec": {"egress": [{}]}})

    async def closed() -> bool:
        got = await cluster.get("networkpolicies", "chat-worker") or {}
        return bool(got.get("spec", {}).get("egress") == policy["spec"]["egress"])

    await cluster.wait_for(closed, what="NetworkPolicy drift undone")

    # rotate: a Job re-wraps the key; until it succeeds, status and pools keep the old key
    await cluster.patch("llmmodels", "smollm2", {"spec": {"encryption": {"keySecretRef": NEW}}})

    async def rotation_job() -> str | None:
        name = (await model_status(cluster, "smollm2")).get("rotationJob")
        return name if name and name in cluster.names("jobs") else None

    rekey = await cluster.wait_for(rotation_job, what="rotation Job")
    body = await cluster.get("jobs", rekey)
    assert body is not None
    container = body["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["llmos-worker", "rewrap-key"]
    assert container["args"][0] == f"/models/{status['path']}"
    assert (await model_status(cluster, "smollm2"))["keySecretRef"] == OLD
    args, volumes = worker(await cluster.get("deployments", "chat") or {})
    assert volumes["model-key"]["secret"]["secretName"] == OLD["name"]

    done = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
    await cluster.patch("jobs", rekey, {"status": done}, sub="status")

    async def rotated() -> bool:
        return (await model_status(cluster, "smollm2")).get("keySecretRef") == NEW

    await cluster.wait_for(rotated, what="status follows the new key")

    async def pool_rolled() -> bool:
        _, volumes = worker(await cluster.get("deployments", "chat") or {})
        return bool(volumes["model-key"]["secret"]["secretName"] == NEW["name"])

    await cluster.wait_for(pool_rolled, what="the pool's workers get the new key")
    conditions = {c["type"]: c for c in (await model_status(cluster, "smollm2"))["conditions"]}
    assert conditions["KeyRotated"]["status"] == "True"
    assert conditions["Ready"]["status"] == "True"

    # deleting the pool and the model removes their NetworkPolicies too
    await cluster.delete("inferencepools", "chat")
    await cluster.delete("llmmodels", "smollm2")

    async def gone() -> bool:
        return not cluster.names("networkpolicies")

    await cluster.wait_for(gone, what="NetworkPolicies removed")

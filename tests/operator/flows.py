"""Steps the operator tests share: apply samples, play the kubelet/Job controller's part."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.operator.conftest import NS, Cluster

ROOT = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "ab" * 32


def sample(kind: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        (ROOT / "manifests" / "samples" / f"{kind.lower()}.yaml").read_text()
    )
    return doc


async def model_status(cluster: Cluster, name: str) -> dict[str, Any]:
    obj = await cluster.get("llmmodels", name)
    return dict((obj or {}).get("status") or {})


async def pool_condition(cluster: Cluster, name: str, type_: str) -> dict[str, Any]:
    obj = await cluster.get("inferencepools", name) or {}
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


async def finish_loader(
    cluster: Cluster, model: str, *, digest: str = DIGEST, size: int = 1234, ok: bool = True
) -> str:
    """Wait for the model's loader Job, then finish it as kubelet + Job controller would."""

    async def job() -> str | None:
        status = await model_status(cluster, model)
        name = status.get("loadJob")
        return name if name and name in cluster.names("jobs") else None

    job_name = await cluster.wait_for(job, what=f"loader Job of {model}")
    body = await cluster.get("jobs", job_name)
    assert body is not None
    labels = body["spec"]["template"]["metadata"]["labels"]
    message = json.dumps({"digest": digest, "sizeBytes": size, "files": ["model.gguf"]})
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{job_name}-x1", "namespace": NS, "labels": labels},
        "spec": body["spec"]["template"]["spec"],
    }
    await cluster.create("pods", pod)
    terminated = {"exitCode": 0 if ok else 1, "reason": "Completed" if ok else "Error"}
    terminated["message"] = message if ok else "sha256 mismatch: expected aa.., got bb.."
    await cluster.patch(
        "pods",
        pod["metadata"]["name"],
        {"status": {"containerStatuses": [{"name": "fetch", "state": {"terminated": terminated}}]}},
        sub="status",
    )
    condition = (
        {"type": "Complete", "status": "True"}
        if ok
        else {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
              "message": "Job has reached the specified backoff limit"}
    )  # fmt: skip
    job_status = {"conditions": [condition], "succeeded" if ok else "failed": 1}
    await cluster.patch("jobs", job_name, {"status": job_status}, sub="status")
    return str(job_name)


async def ready_model(cluster: Cluster) -> dict[str, Any]:
    await cluster.create("llmmodels", sample("LLMModel"))
    await finish_loader(cluster, "smollm2")

    async def ready() -> dict[str, Any] | None:
        status = await model_status(cluster, "smollm2")
        return status if status.get("phase") == "Ready" else None

    result: dict[str, Any] = await cluster.wait_for(ready, what="model Ready")
    return result


async def mark_deployment_ready(cluster: Cluster, name: str, replicas: int) -> None:
    """Report the Deployment's pods as the Deployment controller would once they are ready."""
    body = await cluster.get("deployments", name)
    assert body is not None
    status = {
        "observedGeneration": body["metadata"]["generation"],
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
        "conditions": [
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
            {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
        ],
    }
    await cluster.patch("deployments", name, {"status": status}, sub="status")

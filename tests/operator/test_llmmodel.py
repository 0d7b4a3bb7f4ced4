"""LLMModel against the emulated API server: PVC + loader Job, phases, versions, failures."""

from __future__ import annotations

from typing import Any

from tests.operator.conftest import Cluster, OperatorProcess
from tests.operator.flows import DIGEST, finish_loader, model_status, sample


async def test_sample_model_loads_to_ready(cluster: Cluster, operator: OperatorProcess) -> None:
    model = await cluster.create("llmmodels", sample("LLMModel"))

    async def loading() -> bool:
        return (await model_status(cluster, "smollm2")).get("phase") == "Loading"

    await cluster.wait_for(loading, what="phase Loading")
    assert cluster.names("persistentvolumeclaims") == ["smollm2-weights"]
    [job_name] = cluster.names("jobs")
    job = await cluster.get("jobs", job_name)
    assert job is not None
    assert job["metadata"]["ownerReferences"][0]["uid"] == model["metadata"]["uid"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["llmos-worker", "fetch-model"]
    assert "builtin://smollm2-135m-instruct" in container["args"]

    await finish_loader(cluster, "smollm2", size=4321)

    async def ready() -> dict[str, Any] | None:
        status = await model_status(cluster, "smollm2")
        return status if status.get("phase") == "Ready" else None

    status = await cluster.wait_for(ready, what="phase Ready")
    assert status["digest"] == DIGEST and status["sizeBytes"] == 4321
    assert status["servedVersion"] == "0.1.2"
    assert status["observedGeneration"] == 1
    assert [h["version"] for h in status["history"]] == ["0.1.2"]
    [cond] = status["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Ready", "True", "Loaded")

    # a new version: a new Job beside the old one; the old version keeps being served meanwhile
    await cluster.patch("llmmodels", "smollm2", {"spec": {"version": "0.2.0"}})

    async def reloading() -> dict[str, Any] | None:
        status = await model_status(cluster, "smollm2")
        return status if status.get("phase") == "Loading" else None

    status = await cluster.wait_for(reloading, what="new load")
    assert status["servedVersion"] == "0.1.2" and status["observedGeneration"] == 2
    assert len(cluster.names("jobs")) == 2
    await finish_loader(cluster, "smollm2", digest="sha256:" + "cd" * 32)

    async def reloaded() -> dict[str, Any] | None:
        status = await model_status(cluster, "smollm2")
        return status if status.get("servedVersion") == "0.2.0" else None

    status = await cluster.wait_for(reloaded, what="version 0.2.0 Ready")
    assert status["phase"] == "Ready"
    assert [h["version"] for h in status["history"]] == ["0.2.0", "0.1.2"]
    assert status["path"] != status["history"][1]["path"]


async def test_failed_loader_gives_failed_phase_with_reason(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await cluster.create("llmmodels", sample("LLMModel"))
    await finish_loader(cluster, "smollm2", ok=False)

    async def failed() -> dict[str, Any] | None:
        status = await model_status(cluster, "smollm2")
        return status if status.get("phase") == "Failed" else None

    status = await cluster.wait_for(failed, what="phase Failed")
    [cond] = status["conditions"]
    assert cond["reason"] == "BackoffLimitExceeded"
    assert "sha256 mismatch" in cond["message"]
    assert "servedVersion" not in status
    assert len(cluster.names("jobs")) == 1  # a failed load is not retried behind the user's back


async def test_invalid_model_spec_is_reported_not_crashed(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    bad = sample("LLMModel")
    bad["metadata"]["name"] = "bad"
    bad["spec"]["source"] = "https://example.com/model.gguf"  # no sha256
    bad["spec"]["storage"]["size"] = "a lot"
    await cluster.create("llmmodels", bad)
    await cluster.create("llmmodels", sample("LLMModel"))

    async def reported() -> dict[str, Any] | None:
        status = await model_status(cluster, "bad")
        return status if status.get("phase") == "Failed" else None

    status = await cluster.wait_for(reported, what="invalid spec reported")
    message = status["conditions"][0]["message"]
    assert status["conditions"][0]["reason"] == "InvalidSpec"
    assert message.startswith("spec.storage.size: ") and "Kubernetes quantity" in message
    await finish_loader(cluster, "smollm2")  # the operator carries on with the valid one
    assert "bad-weights" not in cluster.names("persistentvolumeclaims")


async def test_delete_model_cleans_up(cluster: Cluster, operator: OperatorProcess) -> None:
    await cluster.create("llmmodels", sample("LLMModel"))
    await finish_loader(cluster, "smollm2")
    await cluster.delete("llmmodels", "smollm2")

    async def gone() -> bool:
        return (
            await cluster.get("llmmodels", "smollm2") is None
            and not cluster.names("jobs")
            and not cluster.names("persistentvolumeclaims")
        )

    await cluster.wait_for(gone, what="model and children deleted")

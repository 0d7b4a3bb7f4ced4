"""LLMModel spec.adapters against the emulated API server: a loader Job per adapter, their
completion read back into status.adapters, a failed adapter reported, a removed one dropped."""

from __future__ import annotations

import json
from typing import Any

from llmos_operator.api.llmmodel import LLMModelSpec
from llmos_operator.builders.adapters import ADAPTER_LABEL, worker_lora_args
from tests.operator.conftest import NS, Cluster, OperatorProcess
from tests.operator.flows import finish_loader, model_status, sample

MODEL = "smollm2-lora"


async def finish_job(cluster: Cluster, job_name: str, *, message: str, ok: bool = True) -> None:
    """End a loader Job as kubelet + the Job controller would: a terminated pod, a condition."""
    body = await cluster.get("jobs", job_name)
    assert body is not None
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job_name}-p1",
            "namespace": NS,
            "labels": body["spec"]["template"]["metadata"]["labels"],
        },
        "spec": body["spec"]["template"]["spec"],
    }
    await cluster.create("pods", pod)
    terminated = {"exitCode": 0 if ok else 1, "message": message}
    status = {"containerStatuses": [{"name": "fetch", "state": {"terminated": terminated}}]}
    await cluster.patch("pods", pod["metadata"]["name"], {"status": status}, sub="status")
    condition = (
        {"type": "Complete", "status": "True"}
        if ok
        else {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}
    )
    job_status = {"conditions": [condition], "succeeded" if ok else "failed": 1}
    await cluster.patch("jobs", job_name, {"status": job_status}, sub="status")


async def adapter_jobs(cluster: Cluster, count: int) -> dict[str, dict[str, Any]]:
    """adapter name -> its loader Job, once the model's status names `count` of them."""

    async def listed() -> dict[str, dict[str, Any]] | None:
        entries = (await model_status(cluster, MODEL)).get("adapters") or []
        jobs = {}
        for entry in entries:
            job = await cluster.get("jobs", entry.get("loadJob", ""))
            if job is not None:
                jobs[entry["name"]] = job
        return jobs if len(jobs) == count else None

    result: dict[str, dict[str, Any]] = await cluster.wait_for(listed, what="adapter Jobs")
    return result


def manifest(digest: str, size: int, rank: int) -> str:
    return json.dumps(
        {
            "digest": digest,
            "sizeBytes": size,
            "rank": rank,
            "encrypted": True,
            "format": "peft-lora",
        }
    )


async def test_two_adapters_load_to_ready_with_digests(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    body = sample("LLMModel-adapters")
    await cluster.create("llmmodels", body)
    jobs = await adapter_jobs(cluster, 2)
    assert sorted(jobs) == ["sql-helper", "support-tone"]
    status = await model_status(cluster, MODEL)
    assert [e["name"] for e in status["adapters"]] == ["sql-helper", "support-tone"]
    assert {e["phase"] for e in status["adapters"]} == {"Loading"}

    sql = jobs["sql-helper"]
    assert sql["metadata"]["labels"][ADAPTER_LABEL] == "sql-helper"
    pod = sql["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["llmos-worker", "fetch-model"]
    args = container["args"]
    assert "--adapter" in args and "--format" not in args
    assert args[args.index("--source") + 1] == "/sources/team-a-adapters/sql-helper"
    assert args[args.index("--dest") + 1].startswith("/models/lora-")
    assert "--encrypt-key-file" in args  # the model is encrypted, so are its adapters
    assert {v["name"] for v in pod["volumes"]} >= {"models", "source", "encryption-key"}
    tone_args = jobs["support-tone"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert tone_args[tone_args.index("--sha256") + 1] == body["spec"]["adapters"][1]["sha256"]

    digests = {"sql-helper": "1a" * 32, "support-tone": "2b" * 32}
    for name, job in jobs.items():
        await finish_job(cluster, job["metadata"]["name"], message=manifest(digests[name], 4096, 8))
    await finish_loader(cluster, MODEL)

    async def ready() -> dict[str, Any] | None:
        status = await model_status(cluster, MODEL)
        entries = status.get("adapters") or []
        done = status.get("phase") == "Ready" and all(e["phase"] == "Ready" for e in entries)
        return status if done else None

    status = await cluster.wait_for(ready, what="model and adapters Ready")
    by_name = {e["name"]: e for e in status["adapters"]}
    for name, digest in digests.items():
        entry = by_name[name]
        assert entry["digest"] == digest and entry["sizeBytes"] == 4096 and entry["rank"] == 8
        assert entry["path"].startswith("lora-") and entry["encrypted"] is True
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["AdaptersReady"]["status"] == "True"

    spec = LLMModelSpec.model_validate((await cluster.get("llmmodels", MODEL) or {})["spec"])
    flags = worker_lora_args(spec, status)
    assert flags[:4] == [
        "--lora",
        f"sql-helper=/models/{by_name['sql-helper']['path']}",
        "--lora",
        f"support-tone=/models/{by_name['support-tone']['path']}",
    ]
    assert flags[4:] == [
        "--max-loras", "2", "--max-lora-rank", "8", "--lora-key-file", "/etc/llmos/model-key/kek"
    ]  # fmt: skip

    # a pool of the model serves its adapters: the worker Deployment carries those flags
    pool = sample("InferencePool")
    pool["metadata"]["name"] = "lora-pool"
    pool["spec"]["modelRef"] = MODEL
    await cluster.create("inferencepools", pool)

    async def worker_args() -> list[str] | None:
        dep = await cluster.get("deployments", "lora-pool")
        return dep["spec"]["template"]["spec"]["containers"][0]["args"] if dep else None

    args = await cluster.wait_for(worker_args, what="the pool's worker Deployment")
    start = args.index("--lora")
    assert args[start : start + len(flags)] == flags
    assert args.count("--lora") == 2

    # a new version of one adapter: a new Job; it fails, the old directory stays served
    adapters = body["spec"]["adapters"]
    adapters[0]["version"] = "4"
    await cluster.patch("llmmodels", MODEL, {"spec": {"adapters": adapters}})

    async def reloading() -> dict[str, Any] | None:
        entries = (await model_status(cluster, MODEL)).get("adapters") or []
        entry = next(e for e in entries if e["name"] == "sql-helper")
        return entry if entry["loadJob"] != jobs["sql-helper"]["metadata"]["name"] else None

    entry = await cluster.wait_for(reloading, what="new adapter load")
    assert entry["path"] == by_name["sql-helper"]["path"]
    await cluster.wait_for(lambda: _exists(cluster, entry["loadJob"]), what="the new adapter Job")
    await finish_job(cluster, entry["loadJob"], message='{"error": "bad", "reason": "X"}', ok=False)

    async def failed() -> dict[str, Any] | None:
        status = await model_status(cluster, MODEL)
        entry = next(e for e in status.get("adapters") or [] if e["name"] == "sql-helper")
        return status if entry["phase"] == "Failed" else None

    status = await cluster.wait_for(failed, what="adapter Failed")
    entry = next(e for e in status["adapters"] if e["name"] == "sql-helper")
    assert "BackoffLimitExceeded" in entry["message"] and "bad" in entry["message"]
    assert entry["path"] == by_name["sql-helper"]["path"]  # still served
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["AdaptersReady"]["reason"] == "AdapterFailed"
    assert conditions["Ready"]["status"] == "True"  # the model itself is fine

    # removing an adapter drops its entry; nothing is deleted from the volume or the Jobs
    await cluster.patch("llmmodels", MODEL, {"spec": {"adapters": adapters[1:]}})

    async def removed() -> list[str] | None:
        entries = (await model_status(cluster, MODEL)).get("adapters") or []
        names = [e["name"] for e in entries]
        return names if names == ["support-tone"] else None

    await cluster.wait_for(removed, what="adapter removed from status")
    assert jobs["sql-helper"]["metadata"]["name"] in cluster.names("jobs")


async def _exists(cluster: Cluster, job_name: str) -> bool:
    return job_name in cluster.names("jobs")


async def _rotation_job(cluster: Cluster, path: str) -> str | None:
    """The rotation Job whose first directory argument is `path`, once it exists."""
    for name in cluster.names("jobs"):
        job = await cluster.get("jobs", name) or {}
        c = job["spec"]["template"]["spec"]["containers"][0]
        if c["command"] == ["llmos-worker", "rewrap-key"] and c["args"][0] == f"/models/{path}":
            return str(name)
    return None


async def test_key_rotation_rewraps_adapters_loaded_under_the_old_key(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    old, new = {"name": "kek-2024", "key": "kek"}, {"name": "kek-2025", "key": "kek"}
    body = sample("LLMModel-adapters")
    body["spec"]["encryption"]["keySecretRef"] = old
    sql, tone = body["spec"]["adapters"]
    body["spec"]["adapters"] = [sql]
    await cluster.create("llmmodels", body)
    jobs = await adapter_jobs(cluster, 1)
    await finish_job(
        cluster, jobs["sql-helper"]["metadata"]["name"], message=manifest("1a" * 32, 10, 8)
    )
    await finish_loader(cluster, MODEL)

    async def ready() -> dict[str, Any] | None:
        status = await model_status(cluster, MODEL)
        entries = status.get("adapters") or []
        return status if status.get("phase") == "Ready" and entries[0]["phase"] == "Ready" else None

    status = await cluster.wait_for(ready, what="model and adapter Ready")
    assert status["keySecretRef"] == old
    sql_path = status["adapters"][0]["path"]

    # a second adapter starts loading under the current key; then the key is rotated
    await cluster.patch("llmmodels", MODEL, {"spec": {"adapters": [sql, tone]}})
    jobs = await adapter_jobs(cluster, 2)
    tone_job = jobs["support-tone"]
    volumes = {v["name"]: v for v in tone_job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["encryption-key"]["secret"]["secretName"] == old["name"]
    await cluster.patch("llmmodels", MODEL, {"spec": {"encryption": {"keySecretRef": new}}})
    rekey = await cluster.wait_for(lambda: _rotation_job(cluster, status["path"]), what="rekey")
    rekey_body = await cluster.get("jobs", rekey) or {}
    # the served adapter is re-wrapped with the model in the same Job
    assert rekey_body["spec"]["template"]["spec"]["containers"][0]["args"][1] == (
        f"/models/{sql_path}"
    )
    done = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
    await cluster.patch("jobs", rekey, {"status": done}, sub="status")

    async def rotated() -> bool:
        return (await model_status(cluster, MODEL)).get("keySecretRef") == new

    await cluster.wait_for(rotated, what="model key rotated")

    # the second adapter's loader used the old key: it is re-wrapped before it counts as Ready
    await finish_job(cluster, tone_job["metadata"]["name"], message=manifest("2b" * 32, 10, 8))
    tone_path = "lora-" + tone_job["metadata"]["labels"]["llmos.dev/load"]
    tone_rekey = await cluster.wait_for(
        lambda: _rotation_job(cluster, tone_path), what="adapter rekey Job"
    )

    async def tone_entry() -> dict[str, Any]:
        entries = (await model_status(cluster, MODEL)).get("adapters") or []
        return next(e for e in entries if e["name"] == "support-tone")

    async def rewrapping() -> bool:
        return "re-wraps" in (await tone_entry()).get("message", "")

    await cluster.wait_for(rewrapping, what="adapter waits for its re-wrap")
    assert (await tone_entry())["phase"] == "Loading"
    await cluster.patch("jobs", tone_rekey, {"status": done}, sub="status")

    async def tone_ready() -> dict[str, Any] | None:
        entry = await tone_entry()
        return entry if entry["phase"] == "Ready" else None

    entry = await cluster.wait_for(tone_ready, what="second adapter Ready")
    assert entry["path"] == tone_path and entry["digest"] == "2b" * 32


async def test_adapter_named_like_its_model_fails_without_a_job(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    body = sample("LLMModel-adapters")
    body["spec"]["adapters"][0]["name"] = MODEL
    await cluster.create("llmmodels", body)

    async def settled() -> list[dict[str, Any]] | None:
        entries = (await model_status(cluster, MODEL)).get("adapters") or []
        return entries if [e["phase"] for e in entries] == ["Failed", "Loading"] else None

    refused, tone = await cluster.wait_for(settled, what="one adapter refused, one loading")
    assert refused["name"] == MODEL and "base model" in refused["message"]
    assert "loadJob" not in refused
    lora_jobs = [n for n in cluster.names("jobs") if n.startswith(f"{MODEL}-lora-")]
    assert lora_jobs == [tone["loadJob"]]

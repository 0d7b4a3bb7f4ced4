"""QuotaPolicy end to end against kmock: admission over real HTTPS, ResourceQuotas, QuotaExceeded.

The real kopf operator (the whole registry) runs against the emulator; its admission server
listens on loopback with its self-signed certificate, and the tests post AdmissionReview v1
payloads to it over TLS, verifying the certificate against the CA bundle the server dumps.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos_operator.quota.webhook import WebhookConfig
from tests.operator import conftest as core
from tests.operator.conftest import NS, Cluster, OperatorProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def quota_operator(cluster: Cluster) -> AsyncIterator[tuple[OperatorProcess, int]]:
    """The whole operator, its admission server on a known loopback port; team-a is tier=gpu."""
    ns = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NS, "labels": {"tier": "gpu"}},
    }
    cluster.server.objects["v1/namespaces", None, NS] = ns  # why: kmock's POST path is ambiguous
    port = free_port()
    process = OperatorProcess(
        core.test_config(cluster), webhook=WebhookConfig(addr="127.0.0.1", port=port)
    )
    await process.start()
    yield process, port
    await process.stop()


def policy(gpus: int, name: str = "gpu-standard") -> dict[str, Any]:
    return {
        "apiVersion": "llmos.dev/v1alpha1",
        "kind": "QuotaPolicy",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {"matchLabels": {"tier": "gpu"}},
            "limits": {"gpus": gpus},
            "rateLimits": {"perApiKey": {"tokensPerMinute": 1000}},
        },
    }


def pool(name: str, replicas: int, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "llmos.dev/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"modelRef": "m", "replicas": replicas, "resources": {"gpus": gpus}},
    }


def review(
    obj: dict[str, Any], operation: str = "CREATE", old: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0f0e-" + operation,
            "kind": {"group": "llmos.dev", "version": "v1alpha1", "kind": "InferencePool"},
            "resource": {"group": "llmos.dev", "version": "v1alpha1", "resource": "inferencepools"},
            "namespace": NS,
            "name": obj["metadata"]["name"],
            "operation": operation,
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": obj,
            "oldObject": old,
            "dryRun": False,
        },
    }


async def https_client(port: int) -> httpx.AsyncClient:
    # why: verify TLS for real -- fetch the server's certificate and trust exactly it
    pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", port))
    context = ssl.create_default_context(cadata=pem)
    return httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=context, timeout=10)


async def wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("the admission server never listened")


async def test_admission_over_https(cluster: Cluster, quota_operator: tuple[Any, int]) -> None:
    _, port = quota_operator
    await cluster.create("quotapolicies", policy(4), namespace="")
    await cluster.create("inferencepools", pool("a", replicas=2, gpus=1))
    await wait_listening(port)
    async with await https_client(port) as client:
        ok = await client.post("/quota-pools", json=review(pool("b", replicas=1, gpus=2)))
        assert ok.status_code == 200
        assert ok.json()["response"] == {"uid": "0f0e-CREATE", "allowed": True}

        denied = await client.post("/quota-pools", json=review(pool("b", replicas=2, gpus=2)))
        body = denied.json()["response"]
        assert body["allowed"] is False
        assert body["status"] == {
            "message": "namespace team-a would use 6 GPUs; QuotaPolicy gpu-standard allows 4",
            "code": 403,
        }

        grow = await client.post(
            "/quota-pools",
            json=review(pool("a", replicas=5, gpus=1), "UPDATE", old=pool("a", replicas=2, gpus=1)),
        )
        assert grow.json()["response"]["allowed"] is False
        assert "would use 5 GPUs" in grow.json()["response"]["status"]["message"]

        for malformed in ({"kind": "AdmissionReview"}, [], {"apiVersion": "admission.k8s.io/v1",
                          "kind": "AdmissionReview", "request": {"uid": "x"}}):  # fmt: skip
            bad = await client.post("/quota-pools", json=malformed)
            assert bad.status_code == 400
            assert "malformed AdmissionReview" in bad.json()["error"]
        garbage = await client.post("/quota-pools", content=b"{not json")
        assert garbage.status_code == 400


async def test_policy_change_reevaluates_pools_and_resource_quotas(
    cluster: Cluster, quota_operator: tuple[Any, int]
) -> None:
    await cluster.create("inferencepools", pool("a", replicas=2, gpus=1))
    await cluster.create("quotapolicies", policy(4), namespace="")

    async def rq() -> Any:
        got = await cluster.get("resourcequotas", "llmos-quota-gpu-standard")
        return got and got["spec"]["hard"]

    assert await cluster.wait_for(rq, what="ResourceQuota") == {"requests.nvidia.com/gpu": "4"}

    async def condition(status: str) -> Any:
        body = await cluster.get("inferencepools", "a") or {}
        found = [
            c
            for c in (body.get("status") or {}).get("conditions", [])
            if c["type"] == "QuotaExceeded"
        ]
        return found and found[0]["status"] == status and found[0]

    await cluster.wait_for(lambda: condition("False"), what="QuotaExceeded=False")
    usage = await cluster.wait_for(lambda: _usage(cluster), what="policy usage")
    assert usage == [{"namespace": NS, "gpus": 2, "inferencePools": 1, "totalReplicas": 2}]
    cm = await cluster.wait_for(lambda: cluster.get("configmaps", "a-ratelimits"), what="ConfigMap")
    assert '"tokensPerMinute": 1000' in cm["data"]["ratelimits.json"]

    # tighten: the pool is now over quota; the ResourceQuota follows
    await cluster.patch(
        "quotapolicies", "gpu-standard", {"spec": {"limits": {"gpus": 1}}}, namespace=""
    )
    exceeded = await cluster.wait_for(lambda: condition("True"), what="QuotaExceeded=True")
    assert (
        exceeded["message"]
        == "namespace team-a would use 2 GPUs; QuotaPolicy gpu-standard allows 1"
    )

    async def rq_is(value: str) -> Any:
        return (await rq() or {}).get("requests.nvidia.com/gpu") == value

    await cluster.wait_for(lambda: rq_is("1"), what="ResourceQuota follows")

    # the namespace no longer selected: its ResourceQuota is removed
    elsewhere = {"spec": {"namespaceSelector": {"matchLabels": {"tier": "none"}}}}
    await cluster.patch("quotapolicies", "gpu-standard", elsewhere, namespace="")

    async def rq_gone() -> bool:
        return await cluster.get("resourcequotas", "llmos-quota-gpu-standard") is None

    await cluster.wait_for(rq_gone, what="ResourceQuota removed")


async def _usage(cluster: Cluster) -> Any:
    body = await cluster.get("quotapolicies", "gpu-standard", namespace="") or {}
    return (body.get("status") or {}).get("usage")


def test_manifest_dir_exists() -> None:
    assert (Path(__file__).resolve().parents[2] / "manifests" / "rbac-roles").is_dir()


def model_review(obj: dict[str, Any]) -> dict[str, Any]:
    out = review(obj)
    out["request"]["kind"] = {"group": "llmos.dev", "version": "v1alpha1", "kind": "LLMModel"}
    out["request"]["resource"] = {
        "group": "llmos.dev",
        "version": "v1alpha1",
        "resource": "llmmodels",
    }
    return out


async def test_admission_refuses_an_invalid_spec_naming_the_field(
    cluster: Cluster, quota_operator: tuple[Any, int]
) -> None:
    """With no QuotaPolicy at all: a spec the API models reject is refused at admission, each
    error naming its field; an update that leaves such a spec as it is (a finalizer's removal)
    still passes, so an object admitted before can always be deleted."""
    _, port = quota_operator
    bad = pool("bad", replicas=1, gpus=0)
    bad["spec"]["routing"] = {"loadFactor": 0.5}
    bad["spec"]["replicas"] = -1
    await wait_listening(port)
    async with await https_client(port) as client:
        denied = (await client.post("/quota-pools", json=review(bad))).json()["response"]
        assert denied["allowed"] is False
        assert denied["status"]["code"] == 422
        message = denied["status"]["message"]
        assert "spec.replicas:" in message and "spec.routing.loadFactor:" in message

        changed = pool("bad", replicas=1, gpus=0)
        changed["spec"]["routing"] = {"strategy": "random"}
        update = review(changed, "UPDATE", old=pool("bad", replicas=1, gpus=0))
        refused = (await client.post("/quota-pools", json=update)).json()["response"]
        assert refused["allowed"] is False
        assert "spec.routing.strategy" in refused["status"]["message"]

        finalizer_gone = {**bad, "metadata": {**bad["metadata"], "finalizers": []}}
        same_spec = review(finalizer_gone, "UPDATE", old=bad)
        assert (await client.post("/quota-pools", json=same_spec)).json()["response"][
            "allowed"
        ] is True

        good = (await client.post("/quota-pools", json=review(pool("ok", 1, 0)))).json()
        assert good["response"]["allowed"] is True

        model = {
            "apiVersion": "llmos.dev/v1alpha1",
            "kind": "LLMModel",
            "metadata": {"name": "m", "namespace": NS},
            "spec": {"source": "builtin://smollm2-135m-instruct", "turbo": True},
        }
        got = (await client.post("/quota-models", json=model_review(model))).json()["response"]
        assert got["allowed"] is False and "spec.turbo" in got["status"]["message"]

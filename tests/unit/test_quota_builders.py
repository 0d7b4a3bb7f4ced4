"""ResourceQuota and rate-limit ConfigMap builders: shapes, strictest values, schema validity."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from llmos_operator.quota import (
    Effective,
    Policy,
    build_rate_limits_configmap,
    build_resource_quota,
)
from llmos_operator.quota.ratelimits import worker_env, worker_volume, worker_volume_mount
from llmos_operator.quota.resourcequota import POLICY_LABEL, resource_quota_name

K8S_VERSION = "1.33"


def validate(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def policy(name: str, **spec: Any) -> Policy:
    return Policy.from_body({"metadata": {"name": name}, "spec": spec})


def test_resource_quota_for_gpu_limit() -> None:
    rq = build_resource_quota(policy("gpu-standard", limits={"gpus": 4}), "team-a", "uid-1")
    assert rq is not None
    validate(rq)
    assert rq["metadata"]["name"] == "llmos-quota-gpu-standard"
    assert rq["metadata"]["namespace"] == "team-a"
    assert rq["metadata"]["labels"][POLICY_LABEL] == "gpu-standard"
    assert rq["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert rq["spec"] == {"hard": {"requests.nvidia.com/gpu": "4"}}


def test_no_gpu_limit_no_resource_quota() -> None:
    assert build_resource_quota(policy("p", limits={"inferencePools": 2}), "ns", "u") is None


def test_long_policy_names_stay_valid() -> None:
    long = "p" * 250
    rq = build_resource_quota(policy(long, limits={"gpus": 1}), "ns", "u")
    assert rq is not None
    validate(rq)
    assert len(resource_quota_name(long)) <= 253
    assert len(rq["metadata"]["labels"][POLICY_LABEL]) <= 63


def test_rate_limit_configmap_carries_strictest_document() -> None:
    eff = Effective.merge(
        [
            policy("a", rateLimits={"perApiKey": {"tokensPerMinute": 100}}, priority=1),
            policy("b", rateLimits={"perNamespace": {"requestsPerMinute": 30}}, priority=-2),
        ]
    )
    body = {"metadata": {"name": "chat", "namespace": "team-a", "uid": "pool-uid"}}
    cm = build_rate_limits_configmap(body, eff)
    validate(cm)
    assert cm["metadata"]["name"] == "chat-ratelimits"
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "InferencePool"
    doc = json.loads(cm["data"]["ratelimits.json"])
    assert doc == {
        "version": 1,
        "namespace": "team-a",
        "pool": "chat",
        "policies": ["a", "b"],
        "perNamespace": {"requestsPerMinute": 30},
        "perApiKey": {"tokensPerMinute": 100},
        "priority": 1,
        "fairShareWeight": 1.0,
    }


def test_unlimited_document_and_worker_wiring() -> None:
    body = {"metadata": {"name": "chat", "namespace": "ns", "uid": "u"}}
    doc = json.loads(build_rate_limits_configmap(body, Effective())["data"]["ratelimits.json"])
    assert doc["perNamespace"] is None and doc["perApiKey"] is None and doc["priority"] == 0
    mount = worker_volume_mount()
    assert worker_env()["value"].startswith(mount["mountPath"] + "/")
    assert "subPath" not in mount  # why: kubelet refreshes only whole-directory ConfigMap mounts
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "w", "namespace": "ns"},
        "spec": {
            "volumes": [worker_volume("chat")],
            "containers": [
                {"name": "w", "image": "x", "env": [worker_env()], "volumeMounts": [mount]}
            ],
        },
    }
    validate(pod)


@pytest.mark.parametrize("bad", [{"limits": {"gpus": 1.5}}])
def test_builders_refuse_what_policy_refuses(bad: dict[str, Any]) -> None:
    from llmos_operator.quota import PolicyError

    with pytest.raises(PolicyError):
        policy("p", **bad)

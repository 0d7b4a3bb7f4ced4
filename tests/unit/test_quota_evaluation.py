"""Quota evaluation: selection, strictest-wins merge, verdict messages, allowed replicas."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmos_operator.quota import (
    Effective,
    Policy,
    PolicyError,
    PoolDemand,
    Usage,
    allowed_replicas,
    check_model,
    check_pool,
    effective_for,
    namespace_usage,
)


def policy(name: str, selector: dict[str, Any] | None = None, **spec: Any) -> Policy:
    body = {"metadata": {"name": name}, "spec": {"namespaceSelector": selector or {}, **spec}}
    return Policy.from_body(body)


def pool(
    name: str, ns: str = "team-a", replicas: int = 1, gpus: int = 1, **spec: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns},
        "spec": {"modelRef": "m", "replicas": replicas, "resources": {"gpus": gpus}, **spec},
    }


def test_message_names_policy_limit_and_numbers() -> None:
    eff = Effective.merge([policy("gpu-standard", limits={"gpus": 4})])
    others = [PoolDemand.from_body(pool("a", replicas=2, gpus=1))]
    verdict = check_pool(pool("b", replicas=2, gpus=2), eff, others)
    assert not verdict.allowed
    assert verdict.message == "namespace team-a would use 6 GPUs; QuotaPolicy gpu-standard allows 4"


def test_within_limits_is_allowed() -> None:
    eff = Effective.merge([policy("p", limits={"gpus": 4, "inferencePools": 2})])
    verdict = check_pool(pool("b", replicas=2, gpus=2), eff, [])
    assert verdict.allowed and verdict.message == ""


def test_update_replaces_own_demand_instead_of_adding() -> None:
    eff = Effective.merge([policy("p", limits={"gpus": 4})])
    existing = [PoolDemand.from_body(pool("a", replicas=3, gpus=1))]
    assert check_pool(pool("a", replicas=4, gpus=1), eff, existing).allowed
    denied = check_pool(pool("a", replicas=5, gpus=1), eff, existing)
    assert denied.message == "namespace team-a would use 5 GPUs; QuotaPolicy p allows 4"


def test_strictest_limit_wins_and_is_named() -> None:
    policies = [
        policy("loose", limits={"gpus": 8, "totalReplicas": 2}),
        policy("tight", {"matchLabels": {"tier": "dev"}}, limits={"gpus": 2}),
        policy("other-team", {"matchLabels": {"tier": "prod"}}, limits={"gpus": 0}),
    ]
    eff = effective_for(policies, {"tier": "dev"})
    assert eff.policies == ("loose", "tight")
    assert eff.limits["gpus"].value == 2 and eff.limits["gpus"].policy == "tight"
    assert eff.limits["totalReplicas"].policy == "loose"
    verdict = check_pool(pool("x", replicas=3, gpus=1), eff, [])
    assert verdict.violations == (
        "namespace team-a would use 3 GPUs; QuotaPolicy tight allows 2",
        "namespace team-a would run 3 replicas in total; QuotaPolicy loose allows 2",
    )


def test_pool_count_and_per_pool_replicas_and_autoscaling_peak() -> None:
    eff = Effective.merge([policy("p", limits={"inferencePools": 1, "replicasPerPool": 3})])
    others = [PoolDemand.from_body(pool("a", gpus=0))]
    two = check_pool(pool("b", gpus=0), eff, others)
    assert two.violations == (
        "namespace team-a would have 2 InferencePools; QuotaPolicy p allows 1",
    )
    autoscaled = pool("c", replicas=1, gpus=0, autoscaling={"enabled": True, "maxReplicas": 5})
    verdict = check_pool(autoscaled, eff, [])
    assert verdict.violations == (
        "InferencePool team-a/c asks for up to 5 replicas; QuotaPolicy p allows 3 per pool",
    )


@pytest.mark.parametrize(
    ("labels", "selector", "selected"),
    [
        ({}, {}, True),
        ({"a": "1"}, {"matchLabels": {"a": "1"}}, True),
        ({"a": "2"}, {"matchLabels": {"a": "1"}}, False),
        ({"a": "1"}, {"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, True),
        ({}, {"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, False),
        ({"a": "1"}, {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, 0),
        ({}, {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, True),
        ({"a": ""}, {"matchExpressions": [{"key": "a", "operator": "Exists"}]}, True),
        ({"a": ""}, {"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, False),
        ({"a": "1"}, {"matchExpressions": [{"key": "a", "operator": "Bogus"}]}, False),
    ],
)
def test_namespace_selector(
    labels: dict[str, str], selector: dict[str, Any], selected: bool
) -> None:
    assert policy("p", selector).selects(labels) is bool(selected)


def test_model_sources_must_match_every_listing_policy() -> None:
    eff = Effective.merge(
        [
            policy("a", allowedModelSources=["hf://acme/*", "builtin://*"]),
            policy("b", allowedModelSources=["builtin://*"]),
            policy("c"),  # lists nothing: allows anything
        ]
    )
    model = {"metadata": {"name": "m", "namespace": "ns"}, "spec": {"source": "hf://acme/x@1"}}
    verdict = check_model(model, eff)
    assert verdict.message == (
        "LLMModel ns/m: model source 'hf://acme/x@1' is not allowed by QuotaPolicy b (builtin://*)"
    )
    model["spec"]["source"] = "builtin://smollm2-135m-instruct"
    assert check_model(model, eff).allowed
    # an adapter's source is a model source too: no way around the policy through spec.adapters
    model["spec"]["adapters"] = [
        {"name": "ok", "source": "builtin://lora-a"},
        {"name": "bad", "source": "https://elsewhere.example/lora"},
    ]
    assert check_model(model, eff).message.startswith("LLMModel ns/m spec.adapters[1]: ")


def test_model_size_limit_accepts_quantities() -> None:
    eff = Effective.merge([policy("small", limits={"maxModelSizeBytes": "1Ki"})])
    model = {
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {},
        "status": {"sizeBytes": 2048},
    }
    assert (
        check_model(model, eff).message
        == "model ns/m is 2048 bytes; QuotaPolicy small allows 1024 bytes"
    )
    denied = check_pool(pool("p"), eff, [], model_size_bytes=4096)
    assert "QuotaPolicy small allows 1024 bytes" in denied.message


def test_rates_priority_and_weight_merge_strictest() -> None:
    eff = Effective.merge(
        [
            policy("a", rateLimits={"perApiKey": {"tokensPerMinute": 100}}, priority=-5),
            policy("b", rateLimits={"perApiKey": {"tokensPerMinute": 50, "requestsPerMinute": 9}},
                   priority=3, fairShareWeight=0.5),
        ]
    )  # fmt: skip
    assert eff.per_api_key["tokensPerMinute"].value == 50
    assert eff.per_api_key["requestsPerMinute"].policy == "b"
    assert eff.priority is not None and eff.priority.value == 3  # served last = strictest
    assert eff.fair_share_weight is not None and eff.fair_share_weight.value == 0.5


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"limits": {"gpus": -1}}, "spec.limits.gpus"),
        ({"limits": {"gpus": "four"}}, "spec.limits.gpus"),
        ({"limits": {"maxModelSizeBytes": "lots"}}, "spec.limits.maxModelSizeBytes"),
        ({"limits": "none"}, "spec.limits"),
        ({"allowedModelSources": "hf://*"}, "spec.allowedModelSources"),
        ({"rateLimits": {"perApiKey": {"tokensPerMinute": True}}}, "perApiKey.tokensPerMinute"),
        ({"priority": "high"}, "spec.priority"),
        ({"fairShareWeight": 0}, "spec.fairShareWeight"),
    ],
)
def test_unreadable_policy_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError, match=field.replace(".", r"\.")):
        Policy.from_body({"metadata": {"name": "p"}, "spec": spec})


def test_allowed_replicas_caps_growth_and_keeps_existing() -> None:
    eff = Effective.merge([policy("gpu-standard", limits={"gpus": 4})])
    others = namespace_usage([PoolDemand.from_body(pool("a", replicas=2, gpus=1))])
    n, reason = allowed_replicas(pool("b", replicas=5, gpus=1), eff, others)
    assert n == 2
    assert reason == "namespace team-a would use 7 GPUs; QuotaPolicy gpu-standard allows 4"
    # tightened after the fact: 3 running are kept, none added
    n, reason = allowed_replicas(pool("b", replicas=5, gpus=1), eff, others, current=3)
    assert n == 3 and reason is not None
    # never more than asked, even when running more (scale-down is always allowed)
    assert allowed_replicas(pool("b", replicas=1, gpus=1), eff, others, current=3) == (1, None)
    # one pool too many: nothing new, whatever the replica count
    eff = Effective.merge([policy("p", limits={"inferencePools": 1})])
    n, reason = allowed_replicas(pool("b", replicas=2, gpus=0), eff, Usage(inference_pools=1))
    assert n == 0 and reason is not None and "2 InferencePools" in reason


@given(
    limit=st.integers(0, 40),
    held=st.integers(0, 40),
    gpus=st.integers(0, 4),
    wanted=st.integers(0, 60),
    current=st.integers(0, 60),
)
def test_allowed_replicas_is_the_largest_fitting_count(
    limit: int, held: int, gpus: int, wanted: int, current: int
) -> None:
    eff = Effective.merge([policy("p", limits={"gpus": limit})])
    usage = Usage(gpus=held)
    n, reason = allowed_replicas(pool("b", replicas=wanted, gpus=gpus), eff, usage, current=current)
    fits = [r for r in range(wanted + 1) if held + r * gpus <= limit]
    best = max(fits, default=0)
    assert n == (wanted if best == wanted else min(wanted, max(best, current)))
    assert (reason is None) == (best == wanted)

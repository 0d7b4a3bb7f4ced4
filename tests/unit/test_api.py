"""The pydantic API models refuse hostile or invalid specs with messages naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from llmos_operator.api import InferencePoolSpec, LLMModelSpec, QuotaPolicySpec
from llmos_operator.api.common import quantity_bytes, set_condition
from llmos_operator.status import invalid_spec_message

POOL: dict[str, Any] = {"modelRef": "smollm2"}
MODEL: dict[str, Any] = {"source": "builtin://smollm2-135m-instruct"}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"replicas": -1}, "spec.replicas"),
        ({"modelRef": "Not_A_Name"}, "spec.modelRef"),
        ({"modelRef": "a" * 300}, "spec.modelRef"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory"),
        ({"resources": {"cpu": "-1"}}, "spec.resources.cpu"),
        ({"resources": {"gpus": -2}}, "spec.resources.gpus"),
        ({"engine": {"blockSize": 0}}, "spec.engine.blockSize"),
        ({"engine": {"kvCacheMemoryFraction": 0}}, "spec.engine.kvCacheMemoryFraction"),
        ({"engine": {"dtype": "int4"}}, "spec.engine.dtype"),
        ({"engine": {"turbo": True}}, "spec.engine.turbo"),
        ({"engine": {"quantization": "int3"}}, "spec.engine.quantization"),
        ({"engine": {"quantization": "fp16"}}, "needs dtype float32"),  # default dtype bfloat16
        ({"engine": {"quantization": "int8"}}, "needs dtype float32"),
        (
            {"engine": {"quantization": "fp16", "dtype": "float32"}, "resources": {"gpus": 1}},
            "resources.gpus must be 0",
        ),
        ({"engine": {"kvCacheDtype": "fp8"}}, "spec.engine.kvCacheDtype"),
        ({"unknownField": 1}, "spec.unknownField"),
        (
            {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
            "spec.autoscaling",
        ),
        ({"routing": {"strategy": "random"}}, "spec.routing.strategy"),
        ({"routing": {"loadFactor": 0.9}}, "spec.routing.loadFactor"),
        ({"routing": {"minLoadBound": 0}}, "spec.routing.minLoadBound"),
        ({"routing": {"holdTimeoutSeconds": 0}}, "spec.routing.holdTimeoutSeconds"),
        ({"routing": {"idleScaleToZeroSeconds": -1}}, "spec.routing.idleScaleToZeroSeconds"),
        ({"routing": {"gateway": {"replicas": 0}}}, "spec.routing.gateway.replicas"),
        (
            {"routing": {"gateway": {"resources": {"cpu": "x"}}}},
            "spec.routing.gateway.resources.cpu",
        ),
        ({"routing": {"gateway": {"enable": True}}}, "spec.routing.gateway.enable"),
        ({"canary": {"modelRef": "next", "weight": 101}}, "spec.canary.weight"),
        ({"canary": {"modelRef": "next", "weight": -1}}, "spec.canary.weight"),
        ({"canary": {"modelRef": "Next!", "weight": 5}}, "spec.canary.modelRef"),
        ({"canary": {"modelRef": "next"}}, "spec.canary.weight"),
        ({"canary": {"modelRef": "next", "weight": 5, "replicas": -1}}, "spec.canary.replicas"),
        (
            {
                "canary": {"modelRef": "next", "weight": 5},
                "routing": {"gateway": {"enabled": False}},
            },
            "canary needs routing.gateway.enabled",
        ),
        (
            {
                "routing": {"idleScaleToZeroSeconds": 60},
                "autoscaling": {"enabled": True, "minReplicas": 1},
            },
            "needs autoscaling.minReplicas 0",
        ),
    ],
)
def test_invalid_pool_spec_names_the_field(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        InferencePoolSpec.model_validate({**POOL, **patch})
    assert field in invalid_spec_message(info.value)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"source": "ftp://x/y"}, "spec.source"),
        ({"source": "https://example.com/m.gguf"}, "sha256"),
        ({"source": "builtin://x" + "y" * 3000}, "spec.source"),
        ({"sha256": "XYZ"}, "spec.sha256"),
        ({"format": "pickle"}, "spec.format"),
        ({"version": "-bad"}, "spec.version"),
        ({"storage": {"size": "1 GB"}}, "spec.storage.size"),
        ({"storage": {"accessModes": []}}, "spec.storage.accessModes"),
        ({"encryption": {"enabled": True}}, "keySecretRef"),
    ],
)
def test_invalid_model_spec_names_the_field(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        LLMModelSpec.model_validate({**MODEL, **patch})
    assert field in invalid_spec_message(info.value)


@pytest.mark.parametrize(
    "source",
    [
        "builtin://smollm2-135m-instruct",
        "pvc://models-claim/llm/model.gguf",
        "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main",
        "hf://org/name",
    ],
)
def test_valid_sources(source: str) -> None:
    assert LLMModelSpec.model_validate({"source": source}).source == source
    https = LLMModelSpec.model_validate({"source": "https://x.example/m.gguf", "sha256": "a" * 64})
    assert https.sha256 == "a" * 64


def test_scale_to_zero_with_autoscaling_from_zero() -> None:
    spec = InferencePoolSpec.model_validate(
        {**POOL, "routing": {"idleScaleToZeroSeconds": 60},
         "autoscaling": {"enabled": True, "minReplicas": 0}}
    )  # fmt: skip
    assert spec.routing.idle_scale_to_zero_seconds == 60
    # without autoscaling (or with it off) nothing raises an idle pool back
    InferencePoolSpec.model_validate(
        {**POOL, "routing": {"idleScaleToZeroSeconds": 60},
         "autoscaling": {"enabled": False, "minReplicas": 2}}
    )  # fmt: skip


def test_routing_defaults_and_canary() -> None:
    spec = InferencePoolSpec.model_validate(POOL)
    assert spec.canary is None
    assert spec.routing.to_api() == {
        "strategy": "prefix",
        "loadFactor": 1.25,
        "minLoadBound": 4,
        "holdTimeoutSeconds": 120,
        "idleScaleToZeroSeconds": 0,
        "gateway": {"enabled": True, "replicas": 1, "resources": {"cpu": "1", "memory": "512Mi"}},
    }
    canary = InferencePoolSpec.model_validate({**POOL, "canary": {"modelRef": "next", "weight": 0}})
    assert canary.canary is not None and canary.canary.to_api() == {
        "modelRef": "next",
        "weight": 0,
        "replicas": 1,
    }


def test_defaults_round_trip_camel_case() -> None:
    spec = InferencePoolSpec.model_validate(POOL)
    wire = spec.to_api()
    assert wire["engine"]["enablePrefixCaching"] is True
    assert InferencePoolSpec.model_validate(wire) == spec
    assert QuotaPolicySpec.model_validate({}).fair_share_weight == 1.0


def test_quantities() -> None:
    assert quantity_bytes("1Gi") == 2**30
    assert quantity_bytes("500m") == 1
    assert quantity_bytes(3) == 3
    assert quantity_bytes("2k") == 2000


def test_condition_transition_time_moves_only_on_flip() -> None:
    first = set_condition([], "Ready", "False", "A", "", now="t1", generation=1)
    same = set_condition(first, "Ready", "False", "B", "m", now="t2", generation=2)
    flipped = set_condition(same, "Ready", "True", "C", "", now="t3", generation=2)
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["reason"] == "B"
    assert flipped[0]["lastTransitionTime"] == "t3"

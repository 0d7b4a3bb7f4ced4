"""LLMModel.spec.adapters validation: names, uniqueness, sources, digests, limits; the CRD."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from llmos_operator.api.llmmodel import MAX_ADAPTERS, LLMModelSpec, LLMModelStatus
from llmos_operator.status import invalid_spec_message

MODEL = {"source": "builtin://smollm2-135m-instruct"}
SQL = {"name": "sql-helper", "source": "pvc://adapters/sql"}
CRD = Path(__file__).resolve().parents[2] / "crds" / "llmmodels.llmos.dev.yaml"


def message(adapters: list[dict[str, Any]]) -> str:
    with pytest.raises(ValidationError) as info:
        LLMModelSpec.model_validate({**MODEL, "adapters": adapters})
    return invalid_spec_message(info.value)


def test_adapters_parse_with_defaults() -> None:
    spec = LLMModelSpec.model_validate(
        {
            **MODEL,
            "adapters": [
                SQL,
                {
                    "name": "tone",
                    "source": "https://x.example/a",
                    "sha256": "a" * 64,
                    "version": "2",
                },
                {"name": "t2", "source": "hf://org/loras@main/t2", "sha256": "b" * 64},
            ],
        }
    )
    assert [a.name for a in spec.adapters] == ["sql-helper", "tone", "t2"]
    assert spec.adapters[0].sha256 is None and spec.adapters[0].version is None
    assert LLMModelSpec.model_validate(MODEL).adapters == []


def test_duplicate_names_are_refused_naming_the_field() -> None:
    text = message([SQL, {"name": "other", "source": "pvc://a/b"}, {**SQL, "source": "pvc://c/d"}])
    assert text.startswith("spec.adapters: ")
    assert "adapters[2].name 'sql-helper' repeats adapters[0].name" in text


@pytest.mark.parametrize(
    "name", ["SQL", "sql_helper", "-sql", "sql-", "", "a" * 64, "sql.helper", "sql helper"]
)
def test_bad_names_are_refused(name: str) -> None:
    assert "spec.adapters.0.name" in message([{**SQL, "name": name}])


@pytest.mark.parametrize(
    ("adapter", "field"),
    [
        ({"name": "a", "source": "ftp://x/y"}, "spec.adapters.0.source"),
        ({"name": "a", "source": "https://x.example/a"}, "sha256 is required"),
        ({"name": "a", "source": "hf://org/loras@main"}, "sha256 is required"),
        ({"name": "a", "source": "builtin://smollm2-135m-instruct"}, "no builtin adapters"),
        ({"name": "a", "source": "pvc://c/d", "sha256": "XYZ"}, "spec.adapters.0.sha256"),
        ({"name": "a", "source": "pvc://c/d", "version": "-1"}, "spec.adapters.0.version"),
        ({"name": "a", "source": "pvc://c/d", "rank": 8}, "spec.adapters.0.rank"),
        ({"source": "pvc://c/d"}, "spec.adapters.0.name"),
    ],
)
def test_bad_adapters_name_the_problem(adapter: dict[str, Any], field: str) -> None:
    assert field in message([adapter])


def test_at_most_64_adapters() -> None:
    many = [{"name": f"a{i}", "source": f"pvc://c/a{i}"} for i in range(MAX_ADAPTERS + 1)]
    assert "spec.adapters" in message(many)
    spec = LLMModelSpec.model_validate({**MODEL, "adapters": many[:MAX_ADAPTERS]})
    assert len(spec.adapters) == MAX_ADAPTERS


def test_status_adapters_round_trip() -> None:
    raw = {
        "adapters": [
            {
                "name": "sql-helper",
                "phase": "Ready",
                "digest": "ab" * 32,
                "sizeBytes": 10,
                "rank": 8,
                "encrypted": False,
                "path": "lora-0123456789",
                "loadKey": "0123456789",
                "loadJob": "m-lora-0123456789",
                "message": "loaded",
            }
        ]
    }
    status = LLMModelStatus.model_validate(raw)
    assert status.model_dump(by_alias=True, exclude_none=True)["adapters"] == raw["adapters"]
    with pytest.raises(ValidationError):
        LLMModelStatus.model_validate({"adapters": [{"name": "a", "phase": "Done"}]})


def test_crd_has_adapters_as_a_map_keyed_by_name_with_descriptions() -> None:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    spec = schema["spec"]["properties"]["adapters"]
    assert spec["x-kubernetes-list-type"] == "map"
    assert spec["x-kubernetes-list-map-keys"] == ["name"]
    assert spec["maxItems"] == MAX_ADAPTERS and spec["items"]["required"] == ["name", "source"]
    status = schema["status"]["properties"]["adapters"]["items"]["properties"]
    assert set(status) >= {"name", "phase", "digest", "sizeBytes", "path", "message"}
    for props in (spec["items"]["properties"], status):
        assert all(p.get("description") for p in props.values())

"""The committed CRDs: fresh (regenerated from the models), structural, valid, complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmos_operator import crdgen
from tests.unit.k8s_schema import validate

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crds_are_fresh(tmp_path: Path) -> None:
    crdgen.main([str(tmp_path)])
    generated = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in (ROOT / "crds").iterdir())
    assert generated == committed
    for name in generated:
        assert (tmp_path / name).read_text() == (ROOT / "crds" / name).read_text(), (
            f"crds/{name} is stale: run `make crds`"
        )


def _nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in (schema.get("properties") or {}).items():
        out += _nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out += _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _nodes(schema["additionalProperties"], f"{path}{{}}")
    return out


@pytest.mark.parametrize("info", crdgen.KINDS, ids=lambda i: i.kind)
def test_crd_is_structural_and_valid(info: crdgen.KindInfo) -> None:
    crd = crdgen.crd(info)
    validate(crd)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert "$ref" not in yaml.safe_dump(crd)
    for path, node in _nodes(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"untyped node {path}"
        assert "title" not in node and "$defs" not in node, path
        assert not (node.get("properties") and "additionalProperties" in node), path
        if "anyOf" in node:  # only int-or-string may use anyOf (types only inside)
            assert node.get("x-kubernetes-int-or-string"), path
            assert all(set(option) == {"type"} for option in node["anyOf"]), path
    names = crd["spec"]["names"]
    assert names["categories"] == ["llmos"]
    assert names["shortNames"] == info.short_names
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["additionalPrinterColumns"]


def test_schema_carries_constraints() -> None:
    pool = crdgen.crd(next(k for k in crdgen.KINDS if k.kind == "InferencePool"))
    version = pool["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["modelRef"]
    assert spec["properties"]["replicas"] == {
        "default": 1,
        "description": "Worker pods to run.",
        "maximum": 1000,
        "minimum": 0,
        "type": "integer",
    }
    engine = spec["properties"]["engine"]["properties"]
    assert engine["schedulingPolicy"]["enum"] == ["fcfs", "priority"]
    assert engine["kvCacheMemoryFraction"]["exclusiveMinimum"] is True
    assert engine["maxModelLen"]["nullable"] is True
    assert (engine["kvCacheDtype"]["enum"], engine["kvCacheDtype"]["default"]) == (
        ["auto", "float16"],
        "auto",
    )
    memory = spec["properties"]["resources"]["properties"]["memory"]
    assert memory["x-kubernetes-int-or-string"] is True and "pattern" in memory
    assert spec["properties"]["modelRef"]["maxLength"] == 253
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    model = crdgen.crd(crdgen.KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    source = model["properties"]["spec"]["properties"]["source"]
    assert source["pattern"].startswith("^(builtin://")
    for name in ("source", "format", "version", "storage"):
        assert model["properties"]["spec"]["properties"][name]["description"]


def test_every_field_is_described() -> None:
    for info in crdgen.KINDS:
        schema = crdgen.crd(info)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for part in ("spec", "status"):
            for path, node in _nodes(schema["properties"][part], part)[1:]:
                if not path.endswith(("[]", "{}")):
                    assert node.get("description"), f"{info.kind}.{path} has no description"

"""manifests/: Kubernetes objects validate (pinned version), samples validate against the
pydantic models, kustomizations reference files that exist, pods meet "restricted"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmos_operator.api import InferencePoolSpec, LLMModelSpec, QuotaPolicySpec
from tests.unit.k8s_schema import validate
from tests.unit.pss import violations

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
SPEC_MODELS = {
    "LLMModel": LLMModelSpec,
    "InferencePool": InferencePoolSpec,
    "QuotaPolicy": QuotaPolicySpec,
}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((str(path.relative_to(ROOT)), doc))
    return docs


@pytest.mark.parametrize(
    ("path", "doc"), _documents(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_manifest_is_valid(path: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in SPEC_MODELS:
        assert doc["apiVersion"] == "llmos.dev/v1alpha1"
        SPEC_MODELS[doc["kind"]].model_validate(doc["spec"])
        return
    if "monitoring" in path and doc["apiVersion"].startswith("monitoring.coreos.com"):
        return  # Prometheus operator kinds: not in the Kubernetes schemas
    validate(doc)
    if doc["kind"] == "Namespace":
        assert doc["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    template = doc.get("spec", {}).get("template")
    if doc["kind"] in ("Deployment", "Job", "DaemonSet", "StatefulSet") and template:
        assert violations(template["spec"]) == []


def test_samples_cover_every_kind_once_in_the_kustomization() -> None:
    samples = MANIFESTS / "samples"
    kinds = {doc["kind"] for path, doc in _documents() if "/samples/" in path}
    assert kinds == set(SPEC_MODELS)
    listed = yaml.safe_load((samples / "kustomization.yaml").read_text())["resources"]
    applied = sorted(
        doc["kind"] for entry in listed for doc in yaml.safe_load_all((samples / entry).read_text())
    )
    assert applied == sorted(SPEC_MODELS)  # `kubectl apply -k samples` makes one of each


@pytest.mark.parametrize(
    "kustomization", sorted(MANIFESTS.rglob("kustomization.yaml")), ids=lambda p: p.parent.name
)
def test_kustomization_references_exist(kustomization: Path) -> None:
    data = yaml.safe_load(kustomization.read_text())
    for entry in data.get("resources", []) + data.get("components", []):
        target = (kustomization.parent / entry).resolve()
        assert target.exists(), f"{kustomization}: {entry} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists(), entry


def test_default_overlay_composes_crds_and_base() -> None:
    data = yaml.safe_load((MANIFESTS / "default" / "kustomization.yaml").read_text())
    assert {"../crd", "../base"} <= set(data["resources"])

"""The user-facing ClusterRoles: aggregation labels, and namespace editors cannot write quotas.

The rules are read from the manifest and evaluated the way the RBAC authorizer does (a request
is allowed if any rule matches its API group, resource and verb, "*" matching anything), so the
test proves the property instead of comparing text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES_FILE = ROOT / "manifests" / "rbac-roles" / "clusterroles.yaml"
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def roles() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(ROLES_FILE.read_text()) if d]
    return {d["metadata"]["name"]: d for d in docs}


def allows(role: dict[str, Any], group: str, resource: str, verb: str) -> bool:
    for rule in role.get("rules") or []:
        groups, resources, verbs = (
            rule.get("apiGroups", []),
            rule.get("resources", []),
            rule["verbs"],
        )
        if (
            (group in groups or "*" in groups)
            and (resource in resources or "*" in resources)
            and (verb in verbs or "*" in verbs)
        ):
            return True
    return False


def test_roles_are_valid_and_aggregated() -> None:
    found = roles()
    assert set(found) == {"llmos-admin", "llmos-editor", "llmos-viewer"}
    for role in found.values():
        kubernetes_validate.validate(role, "1.33", strict=True)
    aggregated = {
        name: {
            key.removeprefix(AGGREGATE)
            for key, value in role["metadata"]["labels"].items()
            if key.startswith(AGGREGATE) and value == "true"
        }
        for name, role in found.items()
    }
    assert aggregated == {
        "llmos-admin": {"admin"},
        "llmos-editor": {"edit"},
        "llmos-viewer": {"view"},
    }


@pytest.mark.parametrize("verb", WRITE_VERBS)
@pytest.mark.parametrize("resource", ["quotapolicies", "quotapolicies/status"])
def test_editors_and_viewers_cannot_write_quota_policies(resource: str, verb: str) -> None:
    found = roles()
    assert not allows(found["llmos-editor"], "llmos.dev", resource, verb)
    assert not allows(found["llmos-viewer"], "llmos.dev", resource, verb)


def test_admin_writes_quota_policies_and_editor_writes_workloads() -> None:
    found = roles()
    for verb in WRITE_VERBS:
        assert allows(found["llmos-admin"], "llmos.dev", "quotapolicies", verb)
        for resource in ("llmmodels", "inferencepools", "inferencepools/scale"):
            assert allows(found["llmos-editor"], "llmos.dev", resource, verb)
            assert not allows(found["llmos-viewer"], "llmos.dev", resource, verb)
    for name in ("llmos-editor", "llmos-viewer"):
        assert allows(found[name], "llmos.dev", "quotapolicies", "get")
    # status is the operator's: no user role may write it (else users could fake usage)
    for role in found.values():
        for resource in ("llmmodels/status", "inferencepools/status", "quotapolicies/status"):
            assert not any(allows(role, "llmos.dev", resource, verb) for verb in WRITE_VERBS)


def test_no_wildcards() -> None:
    for role in roles().values():
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(key, [])

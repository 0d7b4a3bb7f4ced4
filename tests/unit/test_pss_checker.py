"""The restricted-profile checker itself: a compliant spec passes, each breach is reported."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.unit.pss import violations

GOOD: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [
        {
            "name": "c",
            "image": "x",
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": True,
            },
        }
    ],
    "volumes": [{"name": "tmp", "emptyDir": {}}],
}


def test_compliant_spec_passes() -> None:
    assert violations(GOOD) == []


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("hostNetwork",), True, "hostNetwork"),
        (("securityContext", "runAsNonRoot"), False, "runAsNonRoot"),
        (("securityContext", "seccompProfile"), {"type": "Unconfined"}, "seccomp"),
        (("containers", 0, "securityContext", "privileged"), True, "privileged"),
        (("containers", 0, "securityContext", "allowPrivilegeEscalation"), True, "Escalation"),
        (("containers", 0, "securityContext", "capabilities"), {"add": ["SYS_ADMIN"]}, "ALL"),
        (("containers", 0, "securityContext", "readOnlyRootFilesystem"), False, "readOnly"),
        (("containers", 0, "securityContext", "runAsUser"), 0, "runAsUser"),
        (("containers", 0, "ports"), [{"containerPort": 80, "hostPort": 80}], "hostPort"),
        (("volumes",), [{"name": "h", "hostPath": {"path": "/"}}], "disallowed type"),
    ],
)
def test_each_breach_is_reported(path: tuple[Any, ...], value: Any, fragment: str) -> None:
    spec = copy.deepcopy(GOOD)
    node: Any = spec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert any(fragment in v for v in violations(spec)), violations(spec)

"""Shared vocabulary of the llmos.dev/v1alpha1 API: the base model, quantities, conditions.

Every kind's spec and status is a pydantic model derived from `ApiModel`: camelCase on the wire,
unknown fields refused, every field described (the descriptions become `kubectl explain` text
through `llmos_operator.crdgen`). Kubernetes quantities ("500m", "16Gi", 2) are kept as the user
wrote them and only checked for shape, because the API server and the kubelet parse them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

GROUP = "llmos.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# why: the same grammar as k8s.io/apimachinery resource.Quantity (its CRD pattern, verbatim).
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?"
    r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)

# DNS-1123 label: names of Kubernetes objects referenced from a spec.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ApiModel(BaseModel):
    """Base of every spec/status model: camelCase aliases, unknown fields are an error."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The wire form (camelCase, unset optional fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _check_quantity(value: str | int) -> str | int:
    if isinstance(value, bool):
        raise ValueError("a quantity is a number or a string like '500m' or '16Gi'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a quantity must not be negative")
        return value
    if not _QUANTITY_RE.match(value) or value.startswith("-"):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. '500m', '16Gi', '2')")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A Kubernetes resource quantity: an integer or a string such as "500m", "16Gi"."""


def quantity_bytes(value: int | str) -> int:
    """The number of bytes (or units) a quantity stands for, rounded up; for quota arithmetic."""
    if isinstance(value, int):
        return value
    suffixes = {
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
        "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
        "E": 1e18,
    }  # fmt: skip
    for suffix in sorted(suffixes, key=len, reverse=True):
        if value.endswith(suffix):
            return int(-(-float(value[: -len(suffix)]) * suffixes[suffix] // 1))
    return int(-(-float(value) // 1))


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """One standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(max_length=316, description="Kind of condition, e.g. Ready.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        default="",
        max_length=1024,
        description="One CamelCase word saying why the condition has its status.",
    )
    message: str = Field(
        default="", max_length=32768, description="Human-readable details of the transition."
    )
    last_transition_time: str | None = Field(
        default=None, description="When the status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation the condition was set from."
    )


class SecretKeyRef(ApiModel):
    """A key inside a Secret in the same namespace."""

    name: str = Field(max_length=253, pattern=NAME_PATTERN, description="Name of the Secret.")
    key: str = Field(max_length=253, min_length=1, description="Key inside the Secret's data.")


class LabelSelectorRequirement(ApiModel):
    """One set-based requirement of a label selector."""

    key: str = Field(max_length=317, description="The label key the selector applies to.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="How the key relates to the values."
    )
    values: list[str] | None = Field(
        default=None, max_length=64, description="Values for In and NotIn; empty otherwise."
    )


class LabelSelector(ApiModel):
    """A Kubernetes label selector (matchLabels AND matchExpressions); empty selects all."""

    match_labels: dict[str, str] | None = Field(
        default=None, description="Labels that must all be present with these values."
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, max_length=32, description="Set-based requirements, all must hold."
    )


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """A copy of `conditions` with `type_` set; lastTransitionTime moves only when status flips."""
    out = [dict(c) for c in conditions if c.get("type") != type_]
    previous = next((c for c in conditions if c.get("type") == type_), None)
    since = (
        previous["lastTransitionTime"]
        if previous and previous.get("status") == status and previous.get("lastTransitionTime")
        else now
    )
    new: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": since,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    out.append(new)
    return sorted(out, key=lambda c: str(c["type"]))

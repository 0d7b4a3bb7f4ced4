"""QuotaPolicy as the quota engine sees it: parsed limits, namespace selection, strictest merge.

A `Policy` is read from a QuotaPolicy body (a plain dict as kopf and the API server hand it
over), so the quota engine never depends on how the body was obtained. Several policies may
select one namespace; `Effective.merge` then takes, field by field, the STRICTEST value: the
smallest limit, the smallest rate, the intersection of allowed model sources (a source must
match every policy that lists patterns), the highest priority value (the engine serves lower
values first, so the highest is the least favoured) and the smallest fair-share weight.
Each effective value remembers the policy it came from, so every refusal can name it.
An absent or empty `namespaceSelector` selects every namespace.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmos_operator.api.common import quantity_bytes

# spec.limits keys, in the order messages list them
LIMIT_FIELDS = ("gpus", "inferencePools", "replicasPerPool", "totalReplicas", "maxModelSizeBytes")
RATE_FIELDS = ("requestsPerMinute", "tokensPerMinute")


class PolicyError(ValueError):
    """A QuotaPolicy body that cannot be read (wrong types); the message names the field."""


def _int_or_none(value: Any, path: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PolicyError(f"{path} must be a non-negative integer, got {value!r}")
    return value


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PolicyError(f"{path} must be an object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Rate:
    """Requests and tokens per minute; None = unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @classmethod
    def from_spec(cls, raw: Any, path: str) -> Rate:
        spec = _mapping(raw, path)
        return cls(
            _int_or_none(spec.get("requestsPerMinute"), f"{path}.requestsPerMinute"),
            _int_or_none(spec.get("tokensPerMinute"), f"{path}.tokensPerMinute"),
        )


@dataclass(frozen=True)
class Policy:
    """One QuotaPolicy: name, selector and the spec fields the quota engine enforces."""

    name: str
    selector: Mapping[str, Any]
    limits: Mapping[str, int]  # only the limits the policy sets
    allowed_sources: tuple[str, ...] = ()  # fnmatch patterns; empty = any source
    per_namespace: Rate = field(default_factory=Rate)
    per_api_key: Rate = field(default_factory=Rate)
    priority: int | None = None  # engine convention: lower is served first
    fair_share_weight: float | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Policy:
        name = str(_mapping(body.get("metadata"), "metadata").get("name", ""))
        spec = _mapping(body.get("spec"), "spec")
        raw_limits = _mapping(spec.get("limits"), "spec.limits")
        limits = {
            key: value
            for key in LIMIT_FIELDS
            if (value := _limit(raw_limits.get(key), f"spec.limits.{key}")) is not None
        }
        sources = spec.get("allowedModelSources") or []
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise PolicyError("spec.allowedModelSources must be a list of strings")
        rates = _mapping(spec.get("rateLimits"), "spec.rateLimits")
        return cls(
            name=name,
            selector=_mapping(spec.get("namespaceSelector"), "spec.namespaceSelector"),
            limits=limits,
            allowed_sources=tuple(sources),
            per_namespace=Rate.from_spec(rates.get("perNamespace"), "spec.rateLimits.perNamespace"),
            per_api_key=Rate.from_spec(rates.get("perApiKey"), "spec.rateLimits.perApiKey"),
            priority=_signed_int_or_none(spec.get("priority"), "spec.priority"),
            fair_share_weight=_weight(spec.get("fairShareWeight")),
        )

    def selects(self, labels: Mapping[str, str]) -> bool:
        """Whether the policy's namespaceSelector matches a namespace with these labels."""
        return selector_matches(self.selector, labels)


def _limit(value: Any, path: str) -> int | None:
    """A limit: an integer, or for maxModelSizeBytes a quantity such as "20Gi"."""
    if isinstance(value, str):
        try:
            value = quantity_bytes(value)
        except ValueError:
            raise PolicyError(f"{path} must be a quantity such as '20Gi', got {value!r}") from None
    return _int_or_none(value, path)


def _weight(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise PolicyError(f"spec.fairShareWeight must be a positive number, got {value!r}")
    return float(value)


def _signed_int_or_none(value: Any, path: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{path} must be an integer, got {value!r}")
    return value


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics: matchLabels AND every matchExpression; {} = all."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False  # why: an unknown operator must never widen a policy's reach
    return True


@dataclass(frozen=True)
class Bound:
    """One effective limit and the policy that imposes it."""

    value: int
    policy: str


@dataclass(frozen=True)
class Weight:
    """The effective fair-share weight and the policy that sets it."""

    value: float
    policy: str


def _tighter(
    current: Bound | None, value: int | None, policy: str, *, lowest: bool = True
) -> Bound | None:
    if value is None:
        return current
    if current is None or (value < current.value if lowest else value > current.value):
        return Bound(value, policy)
    return current


@dataclass(frozen=True)
class Effective:
    """The strictest combination of every policy selecting one namespace."""

    policies: tuple[str, ...] = ()
    limits: Mapping[str, Bound] = field(default_factory=dict)
    sources: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (policy, patterns), all must match
    per_namespace: Mapping[str, Bound] = field(default_factory=dict)
    per_api_key: Mapping[str, Bound] = field(default_factory=dict)
    priority: Bound | None = None  # the HIGHEST value: served last is the strictest
    fair_share_weight: Weight | None = None

    @classmethod
    def merge(cls, policies: Iterable[Policy]) -> Effective:
        ordered = sorted(policies, key=lambda p: p.name)  # why: ties resolve deterministically
        limits: dict[str, Bound] = {}
        per_ns: dict[str, Bound] = {}
        per_key: dict[str, Bound] = {}
        priority: Bound | None = None
        weight: Weight | None = None
        for p in ordered:
            for key in LIMIT_FIELDS:
                if (bound := _tighter(limits.get(key), p.limits.get(key), p.name)) is not None:
                    limits[key] = bound
            for rates, rate in ((per_ns, p.per_namespace), (per_key, p.per_api_key)):
                for key, value in zip(
                    RATE_FIELDS, (rate.requests_per_minute, rate.tokens_per_minute), strict=True
                ):
                    if (bound := _tighter(rates.get(key), value, p.name)) is not None:
                        rates[key] = bound
            priority = _tighter(priority, p.priority, p.name, lowest=False)
            if p.fair_share_weight is not None and (
                weight is None or p.fair_share_weight < weight.value
            ):
                weight = Weight(p.fair_share_weight, p.name)
        return cls(
            policies=tuple(p.name for p in ordered),
            limits=limits,
            sources=tuple((p.name, p.allowed_sources) for p in ordered if p.allowed_sources),
            per_namespace=per_ns,
            per_api_key=per_key,
            priority=priority,
            fair_share_weight=weight,
        )

    def source_refusal(self, source: str) -> str | None:
        """Why `source` is not allowed (naming the policy), or None when every policy allows it."""
        for policy, patterns in self.sources:
            if not any(fnmatch.fnmatchcase(source, pattern) for pattern in patterns):
                listed = ", ".join(patterns)
                return f"model source {source!r} is not allowed by QuotaPolicy {policy} ({listed})"
        return None


def effective_for(policies: Iterable[Policy], labels: Mapping[str, str]) -> Effective:
    """The strictest merge of the policies that select a namespace with `labels`."""
    return Effective.merge(p for p in policies if p.selects(labels))

"""The QuotaPolicy kind (cluster-scoped): what cluster admins allow the namespaces it selects.

Limits on GPUs, pools, replicas and model size; which model sources are allowed; request and
token rate limits delivered to workers; the scheduling priority and fair-share weight of the
selected namespaces. Where several policies select a namespace the strictest limit wins.
"""

from __future__ import annotations

from pydantic import Field

from llmos_operator.api.common import ApiModel, Condition, LabelSelector, Quantity

KIND = "QuotaPolicy"
PLURAL = "quotapolicies"
SINGULAR = "quotapolicy"
SHORT_NAMES = ["qp"]


class QuotaLimits(ApiModel):
    """Upper bounds per selected namespace; an unset limit is unlimited."""

    gpus: int | None = Field(default=None, ge=0, description="GPUs across all pools.")
    inference_pools: int | None = Field(default=None, ge=0, description="InferencePools.")
    replicas_per_pool: int | None = Field(default=None, ge=0, description="Replicas of a pool.")
    total_replicas: int | None = Field(default=None, ge=0, description="Replicas of all pools.")
    max_model_size_bytes: Quantity | None = Field(
        default=None, description="Largest model artifact (e.g. 20Gi)."
    )


class RateLimit(ApiModel):
    """A token-bucket rate limit."""

    requests_per_minute: int | None = Field(default=None, ge=1, description="Requests a minute.")
    tokens_per_minute: int | None = Field(default=None, ge=1, description="Tokens a minute.")


class RateLimits(ApiModel):
    """Rate limits enforced by the workers."""

    per_namespace: RateLimit | None = Field(default=None, description="For each namespace.")
    per_api_key: RateLimit | None = Field(default=None, description="For each API key.")


class QuotaPolicySpec(ApiModel):
    """Desired state of a QuotaPolicy."""

    namespace_selector: LabelSelector = Field(
        default_factory=LabelSelector, description="Namespaces the policy applies to."
    )
    limits: QuotaLimits = Field(default_factory=QuotaLimits, description="Upper bounds.")
    allowed_model_sources: list[str] | None = Field(
        default=None,
        max_length=64,
        description="Glob patterns of allowed LLMModel sources (e.g. 'hf://my-org/*'); "
        "all sources when unset.",
    )
    rate_limits: RateLimits | None = Field(default=None, description="Request/token rates.")
    priority: int = Field(
        default=0, ge=-1000, le=1000, description="Scheduling priority (lower is served first)."
    )
    fair_share_weight: float = Field(
        default=1.0, gt=0.0, le=1000.0, description="Weight in the engine's fair share."
    )


class NamespaceUsage(ApiModel):
    """What one selected namespace uses."""

    namespace: str = Field(max_length=63, description="The namespace.")
    gpus: int = Field(default=0, ge=0, description="GPUs used.")
    inference_pools: int = Field(default=0, ge=0, description="Pools.")
    total_replicas: int = Field(default=0, ge=0, description="Replicas of all pools.")


class QuotaPolicyStatus(ApiModel):
    """Observed state of a QuotaPolicy."""

    usage: list[NamespaceUsage] = Field(
        default_factory=list, description="Usage per selected namespace."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    observed_generation: int | None = Field(default=None, description="Generation observed.")

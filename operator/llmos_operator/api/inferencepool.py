"""The InferencePool kind: the serving of one LLMModel by a set of worker pods.

The spec says which model, how many replicas (or how to autoscale them), what each replica gets
(GPUs, CPU, memory, placement), how its engine is tuned, who may call it, how the pool's gateway
routes requests over the replicas, and optionally a canary: a second set of workers serving
another LLMModel that takes a share of the traffic. The status is read
from the real Deployment: replicas, ready replicas, the label selector (for the scale
subresource), the in-cluster endpoint, and the Ready / Progressing / Degraded conditions (plus
GatewayReady and CanaryReady for the gateway's and the canary's Deployments).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmos_operator.api.common import (
    NAME_PATTERN,
    ApiModel,
    Condition,
    LabelSelector,
    Quantity,
    SecretKeyRef,
)

KIND = "InferencePool"
PLURAL = "inferencepools"
SINGULAR = "inferencepool"
SHORT_NAMES = ["ip"]


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(default=None, max_length=317, description="Taint key to tolerate.")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (default Equal)."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; all effects when unset."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="How long a NoExecute taint is tolerated."
    )


class PoolResources(ApiModel):
    """What each worker replica gets from the node."""

    gpus: int = Field(
        default=0, ge=0, le=16, description="GPUs per replica (nvidia.com/gpu); 0 runs on CPU."
    )
    cpu: Quantity = Field(default="2", description="CPU request and limit per replica.")
    memory: Quantity = Field(default="4Gi", description="Memory request and limit per replica.")
    node_selector: dict[str, str] | None = Field(
        default=None, description="Node labels a worker pod must be scheduled on."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=32, description="Taints the worker pods tolerate."
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, pattern=NAME_PATTERN, description="PriorityClass of pods."
    )


class EngineSettings(ApiModel):
    """Settings of the paged-memory inference engine in every worker."""

    block_size: int = Field(default=16, ge=1, le=256, description="Tokens per KV-cache block.")
    kv_cache_memory_fraction: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="Fraction of free device memory given to the KV cache.",
    )
    max_num_seqs: int = Field(
        default=64, ge=1, le=4096, description="Sequences batched together at most."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        le=1048576,
        description="Longest prompt+completion in tokens; the model's limit when unset.",
    )
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        default="fcfs", description="fcfs serves in arrival order; priority by request priority."
    )
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse KV blocks of shared prompt prefixes."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="Data type of weights and KV cache."
    )
    quantization: Literal["none", "fp16", "int8", "bf16", "int4"] = Field(
        default="none",
        description="Opt-in narrower linear-layer weights for CPU pools: fp16 (half the "
        "weight bytes, fp32 compute, perplexity within 0.5 % of fp32), int8 with per-channel "
        "scales (a quarter; steps of 12+ rows multiply 16-bit activations in integers; "
        "perplexity within 2 %), bf16 (half; on CPUs with AVX512_BF16 steps of 12+ rows "
        "multiply bf16-rounded activations; perplexity within 1 %) or int4 (5 bits per weight: "
        "blocks of 32 with an fp16 scale and minimum, GGUF's Q4_1, so a Q4_1 GGUF's decoder "
        "weights are kept exactly, and the LM head in 8-bit blocks as Q8_0); a decode step "
        "reads proportionally less. Needs dtype float32 and no GPUs.",
    )
    kv_cache_dtype: Literal["auto", "float16"] = Field(
        default="auto",
        description="Data type of the KV cache: auto (the model's dtype) or float16 (twice the "
        "blocks per byte of an fp32 cache, half the bytes decode attention reads; values "
        "rounded to fp16 on write).",
    )

    @model_validator(mode="after")
    def _quantization_dtype(self) -> EngineSettings:
        if self.quantization != "none" and self.dtype != "float32":
            raise ValueError(f"quantization {self.quantization} needs dtype float32")
        return self


class PoolAccess(ApiModel):
    """Who may call the pool (enforced by NetworkPolicy and API keys)."""

    namespace_selectors: list[LabelSelector] | None = Field(
        default=None,
        max_length=16,
        description="Namespaces whose pods may call the pool; the pool's own namespace when unset.",
    )
    pod_selectors: list[LabelSelector] | None = Field(
        default=None, max_length=16, description="Pods (in allowed namespaces) that may call."
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description='Secret key holding the accepted API keys as JSON: {"keys": [{"tenant": '
        '"team-a", "sha256": "<hex sha256 of the key>"}]}; callers then need a bearer key.',
    )


class Autoscaling(ApiModel):
    """Scaling of the replicas on engine signals."""

    enabled: bool = Field(default=False, description="Scale between minReplicas and maxReplicas.")
    min_replicas: int = Field(default=1, ge=0, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Most replicas.")
    metric: Literal["kvCacheUsage", "requestsWaiting", "requestsRunning"] = Field(
        default="kvCacheUsage", description="Engine signal scaled on."
    )
    target: float = Field(
        default=0.7, gt=0.0, le=100000.0, description="Target value of the metric per replica."
    )
    scale_up_stabilization_seconds: int = Field(
        default=0, ge=0, le=3600, description="Window before scaling up."
    )
    scale_down_stabilization_seconds: int = Field(
        default=300, ge=0, le=3600, description="Window before scaling down."
    )
    mode: Literal["builtin", "hpa"] = Field(
        default="builtin",
        description="builtin: the operator scales; hpa: a HorizontalPodAutoscaler does.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self


class GatewayResources(ApiModel):
    """What each gateway replica gets from the node."""

    cpu: Quantity = Field(default="1", description="CPU request and limit per gateway replica.")
    memory: Quantity = Field(
        default="512Mi", description="Memory request and limit per gateway replica."
    )


class GatewaySettings(ApiModel):
    """The pool's gateway: the Deployment behind the pool's Service that routes to the workers."""

    enabled: bool = Field(
        default=True,
        description="Run a gateway in front of the workers; when false the pool's Service "
        "selects the workers directly (no routing, no holding while scaling from zero).",
    )
    replicas: int = Field(default=1, ge=1, le=100, description="Gateway pods to run.")
    resources: GatewayResources = Field(
        default_factory=GatewayResources, description="Per-replica gateway resources."
    )


class Routing(ApiModel):
    """How the gateway spreads requests over the worker replicas."""

    strategy: Literal["prefix", "least-load", "round-robin"] = Field(
        default="prefix",
        description="prefix: requests sharing a prompt prefix go to the same replica (its KV "
        "cache holds the prefix) unless it is overloaded; least-load: the replica with the "
        "least load; round-robin: in turn.",
    )
    load_factor: float = Field(
        default=1.25,
        ge=1.0,
        le=100.0,
        description="prefix routing: a replica takes a request while its load is at most "
        "loadFactor times the mean load of the replicas.",
    )
    min_load_bound: int = Field(
        default=4,
        ge=1,
        le=10000,
        description="prefix routing: the load bound is never below this many requests in "
        "flight, so a lightly loaded replica keeps its prefixes instead of sending a request "
        "where the prefix must be computed again.",
    )
    hold_timeout_seconds: int = Field(
        default=120,
        ge=1,
        le=3600,
        description="How long a request waits for a ready replica (while the pool scales up "
        "from zero) before it is answered 503.",
    )
    idle_scale_to_zero_seconds: int = Field(
        default=0,
        ge=0,
        le=604800,
        description="Seconds without requests after which the gateway scales the pool to zero "
        "replicas (with autoscaling enabled, minReplicas must be 0); 0 never does.",
    )
    gateway: GatewaySettings = Field(
        default_factory=GatewaySettings, description="The gateway Deployment."
    )


class Canary(ApiModel):
    """A second set of workers serving another LLMModel, given a share of the traffic."""

    model_ref: str = Field(
        max_length=253,
        pattern=NAME_PATTERN,
        description="Name of the LLMModel (same namespace) the canary workers serve.",
    )
    weight: int = Field(
        ge=0, le=100, description="Percent of the requests the gateway sends to the canary."
    )
    replicas: int = Field(default=1, ge=0, le=1000, description="Canary worker pods to run.")


class InferencePoolSpec(ApiModel):
    """Desired state of an InferencePool."""

    model_ref: str = Field(
        max_length=253,
        pattern=NAME_PATTERN,
        description="Name of the LLMModel (same namespace) to serve.",
    )
    replicas: int = Field(default=1, ge=0, le=1000, description="Worker pods to run.")
    resources: PoolResources = Field(
        default_factory=PoolResources, description="Per-replica resources and placement."
    )
    engine: EngineSettings = Field(
        default_factory=EngineSettings, description="Inference engine settings."
    )
    access: PoolAccess | None = Field(default=None, description="Who may call the pool.")
    autoscaling: Autoscaling | None = Field(default=None, description="Autoscaling of replicas.")
    routing: Routing = Field(
        default_factory=Routing, description="Request routing by the pool's gateway."
    )
    canary: Canary | None = Field(
        default=None,
        description="Canary workers serving another model for a share of the traffic (needs "
        "routing.gateway.enabled).",
    )

    @model_validator(mode="after")
    def _scale_to_zero_within_autoscaling(self) -> InferencePoolSpec:
        # why: the autoscaler would raise an idle pool straight back to its minimum
        scaler = self.autoscaling
        idle = self.routing.idle_scale_to_zero_seconds > 0
        if idle and scaler is not None and scaler.enabled and scaler.min_replicas > 0:
            raise ValueError(
                "routing.idleScaleToZeroSeconds needs autoscaling.minReplicas 0 "
                f"(it is {scaler.min_replicas})"
            )
        return self

    @model_validator(mode="after")
    def _canary_needs_gateway(self) -> InferencePoolSpec:
        if self.canary is not None and not self.routing.gateway.enabled:
            raise ValueError("canary needs routing.gateway.enabled: the gateway splits traffic")
        return self

    @model_validator(mode="after")
    def _quantization_on_cpu(self) -> InferencePoolSpec:
        if self.engine.quantization != "none" and self.resources.gpus > 0:
            raise ValueError(
                f"engine.quantization {self.engine.quantization} runs on CPU pools only "
                "(resources.gpus must be 0)"
            )
        return self


class AutoscalingStatus(ApiModel):
    """What the autoscaler last saw and decided."""

    current_metric: float | None = Field(default=None, description="Last metric per replica.")
    desired_replicas: int | None = Field(default=None, ge=0, description="Last decision.")
    reason: str | None = Field(
        default=None, max_length=128, description="Short reason of the last decision."
    )
    last_decision: str | None = Field(default=None, max_length=1024, description="Why.")
    last_scale_time: str | None = Field(default=None, description="When it last scaled.")


class InferencePoolStatus(ApiModel):
    """Observed state of an InferencePool, read from its Deployment."""

    replicas: int = Field(default=0, ge=0, description="Worker pods that exist.")
    ready_replicas: int = Field(default=0, ge=0, description="Worker pods that are ready.")
    selector: str | None = Field(default=None, description="Label selector of the worker pods.")
    endpoint: str | None = Field(default=None, description="In-cluster OpenAI base URL.")
    model_version: str | None = Field(default=None, description="Model version being served.")
    autoscaling: AutoscalingStatus | None = Field(
        default=None, description="Autoscaler observations."
    )
    quota: dict[str, str] | None = Field(
        default=None, description="Quota usage notes from QuotaPolicy evaluation."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing and Degraded; GatewayReady with the gateway enabled, "
        "CanaryReady with a canary.",
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation this status describes."
    )

"""The autoscaler's decision: desired replicas of one pool from per-pod metric samples.

A pure function of (policy, observation, previous state, now) in the manner of the Kubernetes HPA
algorithm: the per-replica average of the chosen engine signal is compared with the target
(`ratio = mean / target`), a move smaller than the tolerance is no move, and the raw
recommendation `ceil(ratio * pods)` is then stabilised over two windows: the scale-up window takes
the *lowest* recommendation seen in it (a spike must last the window to count; window 0 = scale up
at once) and the scale-down window the *highest* (load must stay low for the whole window before
replicas go). Pods whose metrics are unknown (unreachable, not ready yet) are never read as zero:
when the known pods ask for more replicas the unknown ones are assumed idle, when they ask for
fewer the unknown ones are assumed exactly at target, so unknowns always damp the move (the HPA's
rule). Bounds come last: min/max replicas, then the quota cap, which wins over everything. Time
comes in as `now` (or through `Autoscaler`'s injected clock); nothing here reads a clock or does
I/O, so recorded metric series replay exactly in tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down", "hold"]


class AutoscalingPolicyError(ValueError):
    """An autoscaling policy that can never work; the message names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"autoscaling.{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class ScalingPolicy:
    """What the pool asks of the autoscaler (InferencePool.spec.autoscaling, in seconds/units)."""

    min_replicas: int
    max_replicas: int
    target: float  # per-replica target of the metric (e.g. 0.7 KV usage, 4 waiting requests)
    scale_up_window_s: float = 0.0
    scale_down_window_s: float = 300.0
    tolerance: float = 0.1  # relative: |mean/target - 1| <= tolerance is no move
    scale_up_limit_pods: int = 4  # one decision adds at most max(current, this) replicas

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise AutoscalingPolicyError("minReplicas", f"must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(self.min_replicas, 1):
            raise AutoscalingPolicyError(
                "maxReplicas",
                f"must be >= 1 and >= minReplicas ({self.min_replicas}), got {self.max_replicas}",
            )
        if not (math.isfinite(self.target) and self.target > 0):
            raise AutoscalingPolicyError("target", f"must be a positive number, got {self.target}")
        for name, window in (
            ("scaleUpStabilizationSeconds", self.scale_up_window_s),
            ("scaleDownStabilizationSeconds", self.scale_down_window_s),
        ):
            if not (math.isfinite(window) and window >= 0):
                raise AutoscalingPolicyError(name, f"must be >= 0 seconds, got {window}")
        if not (0 <= self.tolerance < 1):
            raise AutoscalingPolicyError("tolerance", f"must be in [0, 1), got {self.tolerance}")
        if self.scale_up_limit_pods < 1:
            raise AutoscalingPolicyError(
                "scaleUpLimitPods", f"must be >= 1, got {self.scale_up_limit_pods}"
            )


@dataclass(frozen=True)
class Observation:
    """One scrape of a pool.

    `values` has one entry per ready pod: its metric value, or None when the scrape failed.
    Replicas beyond the ready pods (`current_replicas - len(values)`, e.g. still starting) are
    unknown as well; ready pods beyond `current_replicas` (a scale-down in progress) still count.
    `quota_cap` is the most replicas the namespace's QuotaPolicy allows this pool
    (None: no quota applies).
    """

    current_replicas: int
    values: tuple[float | None, ...]
    quota_cap: int | None = None

    @classmethod
    def of(
        cls, current_replicas: int, values: Sequence[float | None], quota_cap: int | None = None
    ) -> Observation:
        return cls(current_replicas, tuple(values), quota_cap)


@dataclass(frozen=True)
class Recommendation:
    """A raw (unstabilised, bounded) recommendation and when it was made."""

    at: float
    replicas: int


@dataclass(frozen=True)
class ScalerState:
    """What one pool's autoscaler remembers between decisions.

    `started_at` guards restarts: with no history the scale-down window has not been observed,
    so no scale-down happens until a full window has passed since the autoscaler started.
    """

    started_at: float
    recommendations: tuple[Recommendation, ...] = ()
    last_scale_time: float | None = None


@dataclass(frozen=True)
class Decision:
    """The outcome of one `decide` call; `state` is to be passed to the next call."""

    desired_replicas: int
    current_replicas: int
    reason: str  # CamelCase, for status and events
    message: str  # one human sentence
    metric_value: float | None  # per-replica mean over the pods that answered
    recommendation: int  # raw recommendation before stabilisation and bounds
    known_pods: int
    unknown_pods: int
    state: ScalerState = field(repr=False)

    @property
    def direction(self) -> Direction:
        if self.desired_replicas > self.current_replicas:
            return "up"
        if self.desired_replicas < self.current_replicas:
            return "down"
        return "hold"


def _raw_recommendation(
    policy: ScalingPolicy, obs: Observation
) -> tuple[int, str, float | None, int, int]:
    """(replicas, reason, mean, known, unknown) from the metric alone, before any window."""
    known = [v for v in obs.values if v is not None]
    current = obs.current_replicas
    # why: pods beyond spec (a scale-down in progress) still serve; count what really exists
    total = max(current, len(obs.values))
    unknown = total - len(known)
    if not known:
        return current, "NoMetrics", None, 0, unknown
    mean = sum(known) / len(known)
    ratio = mean / policy.target
    if abs(ratio - 1.0) <= policy.tolerance:
        return current, "WithinTolerance", mean, len(known), unknown
    scale_up = ratio > 1.0
    if unknown:
        # why: unknowns damp the move: idle when going up, at target when going down (HPA rule)
        fill = 0.0 if scale_up else policy.target * unknown
        ratio = (sum(known) + fill) / (total * policy.target)
        if abs(ratio - 1.0) <= policy.tolerance or (ratio > 1.0) != scale_up:
            return current, "UnknownPodsDampen", mean, len(known), unknown
    replicas = math.ceil(ratio * total - 1e-9)  # why: 2.0000000001 must not become 3
    reason = "MetricAboveTarget" if scale_up else "MetricBelowTarget"
    return replicas, reason, mean, len(known), unknown


def decide(
    policy: ScalingPolicy, obs: Observation, state: ScalerState | None, *, now: float
) -> Decision:
    """Desired replicas for one pool at time `now` (seconds on any monotonic scale)."""
    if obs.current_replicas < 0:
        raise AutoscalingPolicyError("replicas", f"must be >= 0, got {obs.current_replicas}")
    if state is None:
        state = ScalerState(started_at=now)
    current = obs.current_replicas
    raw, reason, mean, known, unknown = _raw_recommendation(policy, obs)
    bounded_raw = min(max(raw, policy.min_replicas), policy.max_replicas)

    horizon = max(policy.scale_up_window_s, policy.scale_down_window_s)
    history = [r for r in state.recommendations if now - r.at <= horizon]
    history.append(Recommendation(now, bounded_raw))
    up_candidate = min(r.replicas for r in history if now - r.at <= policy.scale_up_window_s)
    down_candidate = max(r.replicas for r in history if now - r.at <= policy.scale_down_window_s)

    desired = current
    if up_candidate > current:
        desired = up_candidate
        limit = current + max(current, policy.scale_up_limit_pods)
        if desired > limit:
            desired, reason = limit, "ScaleUpRateLimited"
    elif down_candidate < current:
        if now - state.started_at < policy.scale_down_window_s:
            reason = "ScaleDownStabilizing"  # why: no full window of history yet (restart)
        else:
            desired = down_candidate
    elif bounded_raw > current:
        reason = "ScaleUpStabilizing"
    elif bounded_raw < current:
        reason = "ScaleDownStabilizing"

    # why: "at the bound because of the bound" is the useful reason, also when nothing moves
    if desired > policy.max_replicas or (desired == policy.max_replicas < raw):
        desired, reason = policy.max_replicas, "LimitedByMaxReplicas"
    if desired < policy.min_replicas or (desired == policy.min_replicas > raw):
        desired, reason = policy.min_replicas, "LimitedByMinReplicas"
    if obs.quota_cap is not None and desired > max(obs.quota_cap, 0):
        desired, reason = max(obs.quota_cap, 0), "LimitedByQuota"

    message = _message(policy, mean, known, unknown, current, desired, raw, reason)
    last_scale = now if desired != current else state.last_scale_time
    new_state = ScalerState(state.started_at, tuple(history), last_scale)
    return Decision(desired, current, reason, message, mean, raw, known, unknown, new_state)


def _message(
    policy: ScalingPolicy,
    mean: float | None,
    known: int,
    unknown: int,
    current: int,
    desired: int,
    raw: int,
    reason: str,
) -> str:
    seen = "no metrics" if mean is None else f"mean {mean:.3g} vs target {policy.target:.3g}"
    return (
        f"{reason}: {seen} over {known} pod(s) ({unknown} unknown); "
        f"recommended {raw}, replicas {current} -> {desired}"
    )


class Autoscaler:
    """`decide` with its state kept and the clock injected (time.monotonic by default)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.state: ScalerState | None = None

    def step(self, policy: ScalingPolicy, obs: Observation) -> Decision:
        decision = decide(policy, obs, self.state, now=self._clock())
        self.state = decision.state
        return decision

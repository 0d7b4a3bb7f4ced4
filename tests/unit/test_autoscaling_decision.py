"""The autoscaler's decision function replayed over recorded metric series.

Each series is a list of (seconds, per-pod values) samples as the handler would scrape them every
5 s; `replay` feeds them through `decide` with the replicas applied at once (a closed loop where a
pool's total load is spread over its replicas), so the tests read like a recorded incident:
load rises -> replicas rise; noise -> nothing moves; load stops -> replicas stay for the whole
scale-down window and only then fall; bounds and quota always win.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import pytest

from llmos_operator.autoscaling import (
    Autoscaler,
    AutoscalingPolicyError,
    Decision,
    Observation,
    ScalerState,
    ScalingPolicy,
    decide,
)

PERIOD = 5.0


def replay(
    policy: ScalingPolicy,
    load_at: Callable[[float], float],
    *,
    duration: float,
    replicas: int,
    quota_cap: int | None = None,
    noise: Callable[[], float] = lambda: 0.0,
) -> list[tuple[float, Decision]]:
    """Closed loop: each pod reports load/replicas (+ noise); the decision is applied at once."""
    state: ScalerState | None = None
    trace: list[tuple[float, Decision]] = []
    t = 0.0
    while t <= duration:
        per_pod = load_at(t) / replicas if replicas else 0.0
        values = [max(per_pod + noise(), 0.0) for _ in range(replicas)]
        decision = decide(policy, Observation.of(replicas, values, quota_cap), state, now=t)
        state = decision.state
        trace.append((t, decision))
        replicas = decision.desired_replicas
        t += PERIOD
    return trace


def replicas_over_time(trace: list[tuple[float, Decision]]) -> list[int]:
    return [d.desired_replicas for _, d in trace]


def test_rises_under_load_to_what_the_load_needs() -> None:
    # KV usage target 0.5 per replica; load ramps from 0.3 to 3.0 replica-units over 60 s.
    policy = ScalingPolicy(min_replicas=1, max_replicas=10, target=0.5, scale_down_window_s=60)
    trace = replay(policy, lambda t: min(0.3 + 0.045 * t, 3.0), duration=120, replicas=1)
    replicas = replicas_over_time(trace)
    assert replicas[0] == 1
    assert replicas == sorted(replicas), "under rising load replicas never go down"
    assert replicas[-1] == math.ceil(3.0 / 0.5)
    ups = [d for _, d in trace if d.direction == "up"]
    assert ups and all(d.reason == "MetricAboveTarget" for d in ups)


def test_scale_up_is_rate_limited_per_decision() -> None:
    policy = ScalingPolicy(min_replicas=1, max_replicas=50, target=1.0, scale_up_limit_pods=4)
    d = decide(policy, Observation.of(1, [40.0]), None, now=0.0)
    assert (d.desired_replicas, d.reason) == (5, "ScaleUpRateLimited")  # 1 + max(1, 4)
    d = decide(policy, Observation.of(10, [4.0] * 10), d.state, now=5.0)
    assert d.desired_replicas == 20  # doubling beats +4 at 10 replicas


def test_holds_through_noise_within_tolerance() -> None:
    rng = random.Random(7)
    policy = ScalingPolicy(min_replicas=1, max_replicas=10, target=0.5, scale_down_window_s=60)
    trace = replay(
        policy,
        lambda t: 2.0,  # 4 replicas x 0.5: exactly on target
        duration=600,
        replicas=4,
        noise=lambda: rng.uniform(-0.045, 0.045),  # < 10 % of target
    )
    assert set(replicas_over_time(trace)) == {4}
    assert {d.reason for _, d in trace} == {"WithinTolerance"}


def test_no_flapping_under_large_noise_with_windows() -> None:
    rng = random.Random(11)
    policy = ScalingPolicy(
        min_replicas=1,
        max_replicas=10,
        target=0.5,
        scale_up_window_s=30,
        scale_down_window_s=120,
    )
    # +-40 % spikes pod by pod; raw recommendations jump between 3 and 6.
    trace = replay(
        policy, lambda t: 2.0, duration=900, replicas=4, noise=lambda: rng.uniform(-0.2, 0.2)
    )
    raws = {d.recommendation for _, d in trace}
    assert len(raws) >= 3, "the series really is noisy"
    replicas = replicas_over_time(trace)
    changes = sum(1 for a, b in itertools.pairwise(replicas) if a != b)
    assert changes == 0, f"flapped: {replicas}"


def test_falls_only_after_the_scale_down_window() -> None:
    window = 120.0
    policy = ScalingPolicy(min_replicas=1, max_replicas=10, target=0.5, scale_down_window_s=window)
    stop = 200.0
    trace = replay(policy, lambda t: 2.0 if t < stop else 0.0, duration=500, replicas=1)
    at_stop = next(d.desired_replicas for t, d in trace if t >= stop - PERIOD)
    assert at_stop == 4
    for t, d in trace:
        if stop <= t < stop + window - PERIOD:
            assert d.desired_replicas == 4, f"fell too early at t={t}"
            assert d.reason == "ScaleDownStabilizing"
    fell = next(t for t, d in trace if t > stop and d.direction == "down")
    # the last high recommendation was made at stop - PERIOD; it leaves the window after `window`
    assert stop + window - PERIOD < fell <= stop + window + PERIOD
    assert trace[-1][1].desired_replicas == 1
    assert trace[-1][1].reason == "LimitedByMinReplicas" or trace[-1][1].direction == "hold"


def test_respects_max_and_min() -> None:
    policy = ScalingPolicy(min_replicas=2, max_replicas=5, target=1.0, scale_down_window_s=0)
    big = replay(policy, lambda t: 100.0, duration=100, replicas=2)
    assert max(replicas_over_time(big)) == 5
    assert big[-1][1].reason == "LimitedByMaxReplicas"
    idle = replay(policy, lambda t: 0.0, duration=100, replicas=5)
    assert min(replicas_over_time(idle)) == 2
    assert idle[-1][1].desired_replicas == 2
    # below min at start (a user set replicas=1): brought up to min even without metrics
    d = decide(policy, Observation.of(1, [None]), None, now=0.0)
    assert (d.desired_replicas, d.reason) == (2, "LimitedByMinReplicas")


def test_quota_cap_wins_over_everything() -> None:
    policy = ScalingPolicy(min_replicas=2, max_replicas=10, target=1.0)
    trace = replay(policy, lambda t: 50.0, duration=100, replicas=2, quota_cap=3)
    assert max(replicas_over_time(trace)) == 3
    assert trace[-1][1].reason == "LimitedByQuota"
    # a cap below minReplicas still wins: the quota is never exceeded
    d = decide(policy, Observation.of(2, [0.5, 0.5], quota_cap=1), None, now=0.0)
    assert (d.desired_replicas, d.reason) == (1, "LimitedByQuota")


def test_unknown_pods_are_unknown_not_zero() -> None:
    policy = ScalingPolicy(min_replicas=1, max_replicas=10, target=0.5, scale_down_window_s=0)
    # two of four pods unreachable, two idle: read as zero this would drop to 1 replica.
    d = decide(policy, Observation.of(4, [0.0, 0.0, None, None]), None, now=0.0)
    assert d.desired_replicas == 2  # (0 + 0 + 2 x target) / (4 x target) = 0.5 -> 2
    assert (d.known_pods, d.unknown_pods) == (2, 2)
    # all known and idle: the same pool does go to 1
    d = decide(policy, Observation.of(4, [0.0] * 4), None, now=0.0)
    assert d.desired_replicas == 1
    # nothing answered: hold, and say why
    d = decide(policy, Observation.of(4, [None] * 4), None, now=0.0)
    assert (d.desired_replicas, d.reason, d.metric_value) == (4, "NoMetrics", None)


def test_unknown_pods_damp_a_scale_up() -> None:
    policy = ScalingPolicy(min_replicas=1, max_replicas=10, target=0.5)
    # one hot pod, one still starting (fewer values than replicas): assumed idle -> on target
    d = decide(policy, Observation.of(2, [0.9]), None, now=0.0)
    assert (d.desired_replicas, d.reason) == (2, "UnknownPodsDampen")
    d = decide(policy, Observation.of(2, [2.0]), None, now=0.0)
    assert d.desired_replicas == 4  # 2.0 / (2 x 0.5) = 2 -> ceil(2 x 2)


def test_restart_does_not_scale_down_before_a_full_window() -> None:
    policy = ScalingPolicy(min_replicas=1, max_replicas=10, target=0.5, scale_down_window_s=60)
    state: ScalerState | None = None
    for t in range(0, 60, 5):
        d = decide(policy, Observation.of(4, [0.0] * 4), state, now=1000.0 + t)
        state = d.state
        assert d.desired_replicas == 4
    d = decide(policy, Observation.of(4, [0.0] * 4), state, now=1060.0)
    assert d.desired_replicas == 1


def test_autoscaler_uses_the_injected_clock() -> None:
    now = [0.0]
    scaler = Autoscaler(clock=lambda: now[0])
    policy = ScalingPolicy(min_replicas=1, max_replicas=4, target=1.0, scale_down_window_s=30)
    assert scaler.step(policy, Observation.of(1, [3.0])).desired_replicas == 3
    assert scaler.state is not None and scaler.state.last_scale_time == 0.0
    now[0] = 10.0
    assert scaler.step(policy, Observation.of(3, [0.0] * 3)).desired_replicas == 3
    now[0] = 31.0
    d = scaler.step(policy, Observation.of(3, [0.0] * 3))
    assert d.desired_replicas == 1 and d.state.last_scale_time == 31.0
    assert "replicas 3 -> 1" in d.message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_replicas": -1, "max_replicas": 3, "target": 1.0}, "minReplicas"),
        ({"min_replicas": 4, "max_replicas": 3, "target": 1.0}, "maxReplicas"),
        ({"min_replicas": 0, "max_replicas": 0, "target": 1.0}, "maxReplicas"),
        ({"min_replicas": 1, "max_replicas": 3, "target": 0.0}, "target"),
        ({"min_replicas": 1, "max_replicas": 3, "target": float("nan")}, "target"),
        (
            {"min_replicas": 1, "max_replicas": 3, "target": 1.0, "scale_down_window_s": -1},
            "scaleDownStabilizationSeconds",
        ),
        ({"min_replicas": 1, "max_replicas": 3, "target": 1.0, "tolerance": 1.5}, "tolerance"),
    ],
)
def test_bad_policy_names_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(AutoscalingPolicyError, match=f"autoscaling.{field}") as info:
        ScalingPolicy(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field

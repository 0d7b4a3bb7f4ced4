"""Token-bucket rate limits: bucket math on an injected clock, scopes, reload, file errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from llmos_worker.errors import EngineOverloadedError
from llmos_worker.server.ratelimit import (
    RateLimiter,
    RateLimitFileError,
    RateLimits,
    limiter_from_env,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(doc: dict[str, Any], clock: Clock) -> RateLimiter:
    return RateLimiter(RateLimits.from_document({"version": 1, **doc}), clock=clock)


def test_tokens_per_minute_bucket_math() -> None:
    clock = Clock()
    rl = limiter({"perApiKey": {"tokensPerMinute": 120}}, clock)
    assert rl.check("k", 100) is None
    assert rl.check("k", 20) is None  # bucket now empty
    assert rl.check("k", 30) == pytest.approx(15.0)  # 30 tokens at 2 tokens/s
    clock.now += 10.0  # +20 tokens
    assert rl.check("k", 30) == pytest.approx(5.0)
    clock.now += 5.0
    assert rl.check("k", 30) is None
    clock.now += 3600.0  # refill caps at one minute's allowance
    assert rl.check("k", 120) is None
    assert rl.check("k", 1) == pytest.approx(0.5)


def test_requests_per_minute_and_key_isolation() -> None:
    clock = Clock()
    rl = limiter({"perApiKey": {"requestsPerMinute": 2}}, clock)
    assert rl.check("alice", 0) is None
    assert rl.check("alice", 0) is None
    assert rl.check("alice", 0) == pytest.approx(30.0)
    assert rl.check("bob", 0) is None  # other keys are unaffected


def test_namespace_bucket_is_shared_and_refusal_takes_nothing() -> None:
    clock = Clock()
    rl = limiter(
        {"perNamespace": {"tokensPerMinute": 100}, "perApiKey": {"tokensPerMinute": 60}}, clock
    )
    assert rl.check("alice", 60) is None
    assert rl.check("bob", 60) == pytest.approx(12.0)  # namespace has 40 left at 100/60 per s
    # the refusal took nothing from bob's own bucket: once the namespace refills, bob pays 60
    clock.now += 12.0
    assert rl.check("bob", 60) is None


def test_oversized_request_waits_for_a_full_bucket_then_leaves_debt() -> None:
    clock = Clock()
    rl = limiter({"perApiKey": {"tokensPerMinute": 60}}, clock)
    assert rl.check("k", 10) is None
    assert rl.check("k", 500) == pytest.approx(10.0)  # waits only until full, not forever
    clock.now += 10.0
    assert rl.check("k", 500) is None
    assert rl.check("k", 1) == pytest.approx(441.0)  # 440 in debt + 1 needed, at 1 token/s


def test_refund_and_enforce_raise_429_error() -> None:
    clock = Clock()
    rl = limiter({"perApiKey": {"tokensPerMinute": 60}, "namespace": "team-a"}, clock)
    assert rl.check("k", 60) is None
    with pytest.raises(EngineOverloadedError, match="team-a") as info:
        rl.enforce("k", 30)
    assert info.value.retry_after_s == pytest.approx(30.0)
    rl.refund("k", 45)  # the request used 15 of 60
    assert rl.check("k", 45) is None


def test_unlimited_and_clock_going_back() -> None:
    clock = Clock()
    rl = limiter({"perNamespace": None, "perApiKey": None}, clock)
    assert all(rl.check("k", 10**9) is None for _ in range(100))
    rl = limiter({"perApiKey": {"requestsPerMinute": 1}}, clock)
    assert rl.check("k", 0) is None
    clock.now -= 500.0
    assert rl.check("k", 0) is not None  # no refill from a backwards step
    with pytest.raises(ValueError):
        rl.check("k", -1)


def test_priority_is_a_floor() -> None:
    rl = limiter({"priority": 5}, Clock())
    assert rl.engine_priority(0) == 5
    assert rl.engine_priority(-100) == 5
    assert rl.engine_priority(9) == 9


def test_file_reload_keeps_levels(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "ratelimits.json"
    path.write_text(json.dumps({"version": 1, "perApiKey": {"tokensPerMinute": 60}}))
    rl = RateLimiter.from_file(path, clock=clock)
    assert rl.check("k", 60) is None
    path.write_text(json.dumps({"version": 1, "perApiKey": {"tokensPerMinute": 6000}}))
    os.utime(path, ns=(1, 10**18))  # a distinct mtime, as kubelet's atomic swap gives
    clock.now += 5.0  # past the reload interval; level 5 of new capacity 6000 (100/s)
    assert rl.limits.per_api_key.tokens_per_minute == 60
    assert rl.check("k", 105) == pytest.approx(1.0)
    assert rl.limits.per_api_key.tokens_per_minute == 6000
    path.write_text("{not json")  # a broken update keeps the last good limits
    os.utime(path, ns=(1, 2 * 10**18))
    clock.now += 5.0
    assert rl.check("k", 1) is None
    assert rl.limits.per_api_key.tokens_per_minute == 6000


def test_missing_file_means_no_limits_until_it_appears(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "ratelimits.json"
    rl = limiter_from_env({"LLMOS_RATE_LIMITS_FILE": str(path)}, clock=clock)
    assert rl is not None and rl.check("k", 10**6) is None
    path.write_text(json.dumps({"perApiKey": {"requestsPerMinute": 1}}))
    clock.now += 5.0
    assert rl.check("k", 0) is None
    assert rl.check("k", 0) == pytest.approx(60.0)
    assert limiter_from_env({}) is None


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ([], "JSON object"),
        ({"version": 2}, "version"),
        ({"perApiKey": {"tokensPerMinute": 0}}, "perApiKey.tokensPerMinute"),
        ({"perApiKey": {"requestsPerMinute": "9"}}, "perApiKey.requestsPerMinute"),
        ({"perNamespace": 5}, "perNamespace"),
        ({"priority": "high"}, "priority"),
    ],
)
def test_malformed_documents_name_the_field(doc: Any, field: str) -> None:
    with pytest.raises(RateLimitFileError, match=field):
        RateLimits.from_document(doc)


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("nope")
    with pytest.raises(RateLimitFileError, match="cannot read"):
        RateLimiter.from_file(path)


def test_a_flood_of_new_callers_keeps_the_bucket_table_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llmos_worker.server import ratelimit

    monkeypatch.setattr(ratelimit, "MAX_TRACKED_KEYS", 64)
    clock = Clock()
    rl = limiter({"perApiKey": {"requestsPerMinute": 10}}, clock)
    rl.check("regular", 0)
    for i in range(1000):  # every new caller leaves a partly drained bucket
        assert rl.check(f"ip:10.{i // 256}.{i % 256}.1", 0) is None
        assert len(rl._buckets) <= 64 + 64 // 8
    newest = "ip:10.3.231.1"  # its bucket is kept: 1 + 9 requests pass, the 11th waits
    assert all(rl.check(newest, 0) is None for _ in range(9))
    assert rl.check(newest, 0) is not None
    # the oldest went first: "regular" got a fresh bucket of 10 again
    assert all(rl.check("regular", 0) is None for _ in range(10))
    clock.now += 60.0  # all refilled: full buckets are dropped at the next prune
    for i in range(9):
        rl.check(f"late-{i}", 0)
    assert len(rl._buckets) <= 64

"""Routing decisions on synthetic loads: ring determinism, stickiness, bounded-load overflow."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from llmos_gateway.replicas import Load, Pool, Replica, parse_load
from llmos_gateway.routing import HashRing, Router, prefix_key, prefix_text


def replicas(n: int) -> list[Replica]:
    return [Replica(name=f"r{i}", url=f"http://10.0.0.{i}:8000") for i in range(n)]


def test_ring_is_deterministic_and_walks_every_replica() -> None:
    a, b = HashRing(["x", "y", "z"]), HashRing(["z", "y", "x"])
    for key in range(0, 2**64, 2**60):
        assert a.walk(key) == b.walk(key)
        assert sorted(a.walk(key)) == ["x", "y", "z"]


def test_prefix_key_shares_long_prefixes_only() -> None:
    shared = "s" * 2000
    assert prefix_key(shared + "question one") == prefix_key(shared + "question two")
    assert prefix_key("short one") != prefix_key("short two")
    chat = {"messages": [{"role": "system", "content": shared}, {"role": "user", "content": "q"}]}
    chat2 = {"messages": [{"role": "system", "content": shared}, {"role": "user", "content": "r"}]}
    assert prefix_key(prefix_text(chat)) == prefix_key(prefix_text(chat2))
    assert prefix_text({"prompt": [1, 2, 3]}) == "1,2,3"
    assert prefix_text(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    )


def test_adapters_key_their_own_prefixes() -> None:
    """A LoRA adapter's requests (model = the adapter) share keys among themselves only: the
    worker salts its prefix cache by adapter, so affinity must follow the same split."""
    router = Router("prefix")
    shared = "s" * 2000
    base = {"model": "base", "prompt": shared + "a"}
    sql = {"model": "sql-lora", "prompt": shared + "a"}
    assert router.key_of(base) == router.key_of({"model": "base", "prompt": shared + "b"})
    assert router.key_of(sql) == router.key_of({"model": "sql-lora", "prompt": shared + "c"})
    assert router.key_of(base) != router.key_of(sql)
    assert router.key_of({"model": "x", "prompt": "hi"}) != router.key_of({"prompt": "hi"})


def test_same_prefix_same_replica_while_load_allows() -> None:
    pool = replicas(3)
    router = Router("prefix")
    key = router.key_of({"prompt": "p" * 3000})
    first = router.choose(pool, key, pool)
    assert first.outcome == "affinity"
    for _ in range(20):
        assert router.choose(pool, key, pool).replica is first.replica


def test_sessions_spread_over_replicas() -> None:
    pool = replicas(3)
    router = Router("prefix")
    homes = Counter(
        router.choose(pool, router.key_of({"prompt": f"session {i} " * 300}), pool).replica.name
        for i in range(300)
    )
    assert set(homes) == {"r0", "r1", "r2"}
    assert min(homes.values()) > 50


def test_overflow_under_skew_goes_to_the_ring_successor() -> None:
    pool = replicas(3)
    router = Router("prefix", load_factor=1.25)
    key = router.key_of({"prompt": "hot " * 1000})
    home = router.choose(pool, key, pool).replica
    picks = []
    for _ in range(30):  # every request of one hot prefix, none finishing
        decision = router.choose(pool, key, pool)
        decision.replica.inflight += 1
        picks.append(decision)
    bound = max(r.inflight for r in pool)
    # the home takes the first ones, up to the floor of the bound, before any overflow
    assert [d.replica for d in picks[: router.min_bound]] == [home] * router.min_bound
    assert picks[router.min_bound].outcome == "overflow"
    assert sum(r.inflight for r in pool) == 30
    assert bound <= math.ceil(30 * 1.25 / 3)  # no replica above factor x mean


def test_a_lightly_loaded_home_keeps_its_prefix_up_to_the_floor() -> None:
    """With 2 in flight over 3 replicas the plain bound is 2; the floor (min_bound) keeps the
    request where its prefix is cached until the home has min_bound requests in flight."""
    pool = replicas(3)
    key = Router("prefix").key_of({"prompt": "session " * 500})
    plain = Router("prefix", min_bound=1)
    home = plain.choose(pool, key, pool).replica
    home.inflight = 2
    assert plain.choose(pool, key, pool).outcome == "overflow"
    for inflight, outcome in ((2, "affinity"), (3, "affinity"), (4, "overflow")):
        home.inflight = inflight
        # a fresh router each time: judged by the load alone, not where the last one went
        decision = Router("prefix", min_bound=4).choose(pool, key, pool)
        assert decision.outcome == outcome, inflight
    with pytest.raises(ValueError, match="min_bound"):
        Router("prefix", min_bound=0)


def test_an_overflowed_prefix_stays_where_it_is_cached() -> None:
    """A prefix that spilled to another replica is cached there: its next request goes there
    (outcome cached) while that replica has room, even once its home is free again."""
    pool = replicas(3)
    router = Router("prefix", load_factor=1.0)
    key = router.key_of({"prompt": "session " * 500})
    home = router.choose(pool, key, pool).replica
    assert router.choose(pool, key, pool).outcome == "affinity"
    home.inflight = 5  # the home replica is busy with other prefixes
    spilled = router.choose(pool, key, pool)
    assert spilled.outcome == "overflow" and spilled.replica is not home
    home.inflight = 0
    again = router.choose(pool, key, pool)
    assert again.replica is spilled.replica and again.outcome == "cached"
    # the memory is bounded
    small = Router("prefix", max_remembered=2)
    for k in range(5):
        small.choose(pool, k, pool)
    assert len(small._served) == 2


def test_a_full_kv_cache_with_waiters_is_skipped() -> None:
    pool = replicas(2)
    router = Router("prefix")
    key = router.key_of({"prompt": "k" * 2000})
    home = router.choose(pool, key, pool).replica
    home.load = Load(running=0, waiting=1, kv_usage=0.99)
    assert router.choose(pool, key, pool).replica is not home


def test_least_load_and_round_robin() -> None:
    pool = replicas(3)
    pool[0].load = Load(running=5)
    pool[1].inflight = 2
    assert Router("least-load").choose(pool, 0, pool).replica is pool[2]
    rr = Router("round-robin")
    assert [rr.choose(pool, 0, pool).replica.name for _ in range(6)] == ["r0", "r1", "r2"] * 2


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown routing strategy"):
        Router("random")  # type: ignore[arg-type]


def test_parse_load_and_pool_ejection() -> None:
    text = (
        "# TYPE llmos_num_requests_running gauge\n"
        'llmos_num_requests_running{model_name="m"} 3.0\n'
        "# TYPE llmos_num_requests_waiting gauge\n"
        'llmos_num_requests_waiting{model_name="m"} 2.0\n'
        "# TYPE llmos_kv_cache_usage_perc gauge\n"
        'llmos_kv_cache_usage_perc{model_name="m"} 0.5\n'
    )
    assert parse_load(text) == Load(running=3, waiting=2, kv_usage=0.5)
    now = [0.0]
    pool = Pool(eject_s=5, clock=lambda: now[0])
    pool.replace(replicas(2))
    a, b = pool.all()
    pool.eject(a)
    assert pool.available() == [b]
    pool.eject(b)
    assert len(pool.available()) == 2  # all ejected: still routable
    now[0] = 6.0
    assert len(pool.available()) == 2

"""Canary split: two versions of a pool's workers take traffic by the canary weight.

The split is checked on its own for several weights and then over 1,000 requests routed by the
real gateway to the session's two tiny workers, one registered as the stable version and one as
the canary: the served counts come from the workers' own request counters and the gateway's
per-version metrics, and must agree with the weight within 5 %.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmos_gateway.replicas import Pool, Replica
from llmos_gateway.routing import CANARY, STABLE, CanarySplit
from tests.gateway.conftest import GatewayServer, WorkerProcess


@pytest.mark.parametrize("weight", [0, 5, 20, 33.3, 50, 90, 100])
def test_split_sends_the_weight_to_the_canary(weight: float) -> None:
    split = CanarySplit(weight)
    picks = [split.choose({STABLE, CANARY}) for _ in range(1000)]
    if weight == 0:
        assert set(picks) == {None}  # no split: every replica serves
        return
    assert abs(picks.count(CANARY) - 10 * weight) <= 1
    # any window is close to the weight too (smooth, not bursts)
    assert abs(picks[:100].count(CANARY) - weight) <= 1


def test_split_needs_both_versions_ready() -> None:
    split = CanarySplit(50)
    assert split.choose({STABLE}) is None and split.choose({CANARY}) is None
    with pytest.raises(ValueError, match="percentage"):
        CanarySplit(101)
    pool = Pool()
    pool.replace([Replica("a", "http://a"), Replica("b", "http://b", version=CANARY)])
    assert [r.name for r in pool.available(CANARY)] == ["b"]


def _completions(metrics_text: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if (
                s.name == "llmos_http_requests_total"
                and s.labels.get("handler") == "/v1/completions"
            ):
                total += s.value
    return total


def test_canary_split_over_1000_routed_requests(workers: list[WorkerProcess]) -> None:
    stable, canary = workers
    model = httpx.get(stable.url + "/v1/models").json()["data"][0]["id"]
    before = [_completions(httpx.get(w.url + "/metrics").text) for w in workers]
    argv = ["--replica", stable.url, "--replica", f"canary={canary.url}", "--canary-weight", "20"]
    with GatewayServer([*argv, "--strategy", "prefix"]) as gw:

        async def run() -> None:
            gate = asyncio.Semaphore(16)
            async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:

                async def one(i: int) -> None:
                    async with gate:
                        r = await client.post(
                            "/v1/completions",
                            json={"model": model, "prompt": f"request {i}", "max_tokens": 1},
                        )
                        assert r.status_code == 200, r.text

                await asyncio.gather(*(one(i) for i in range(1000)))

        asyncio.run(run())
        by_version: dict[str, float] = {}
        for family in gw.core.metrics.upstream_requests.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    by_version[s.labels["version"]] = s.value
    after = [_completions(httpx.get(w.url + "/metrics").text) for w in workers]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 1000
    assert abs(served[1] - 200) <= 0.05 * 200, served
    assert by_version == {"stable": served[0], "canary": served[1]}

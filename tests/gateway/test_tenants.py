"""Tenants at the gateway: API keys, RPM/TPM, weighted fair share under saturation, priority.

The fair queue and the rate limiter are tested directly (deterministic, no clock but a fake one);
fair share runs through the real gateway in front of two gated upstreams given one slot each, so
that requests of two tenants queue whatever the machine's speed and are served by weight; keys
and rate limits run in front of the session's two tiny workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmos_gateway.errors import ConfigError, HTTPError
from llmos_gateway.fairqueue import FairQueue
from llmos_gateway.tenants import (
    Caller,
    RateLimiter,
    TenantPolicy,
    Tenants,
    anonymous_tenant,
    estimate_tokens,
    parse_policies,
)
from tests.gateway.conftest import GatewayServer, WorkerProcess, fake


# ---------------------------------------------------------------- the fair queue alone
async def _served_order(queue: FairQueue, arrivals: list[tuple[str, float, int]]) -> list[str]:
    """Fill one busy slot's queue with `arrivals`, then release one slot at a time."""
    await queue.acquire("blocker")
    order: list[str] = []

    async def one(tenant: str, weight: float, priority: int) -> None:
        await queue.acquire(tenant, weight=weight, priority=priority)
        order.append(tenant)

    tasks = [asyncio.create_task(one(*a)) for a in arrivals]
    while queue.queued < len(arrivals):
        await asyncio.sleep(0)
    for _ in arrivals:
        queue.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return order


async def test_backlogged_tenants_are_served_by_weight() -> None:
    queue = FairQueue(lambda: 1)
    # why: b's requests all arrive first; weight, not arrival, decides the order
    arrivals = [("b", 1.0, 0)] * 30 + [("a", 3.0, 0)] * 30
    order = await _served_order(queue, arrivals)
    first = order[:20]
    assert first.count("a") == 15 and first.count("b") == 5
    assert sorted(order) == sorted(t for t, _, _ in arrivals)


async def test_priority_goes_first_and_idle_tenants_get_no_credit() -> None:
    queue = FairQueue(lambda: 1)
    order = await _served_order(queue, [("a", 1.0, 0)] * 5 + [("urgent", 1.0, -1)])
    assert order[0] == "urgent"
    # a tenant that arrives after others were served starts at the current virtual time
    queue2 = FairQueue(lambda: 1)
    order2 = await _served_order(queue2, [("a", 1.0, 0)] * 10 + [("late", 1.0, 0)])
    assert order2.index("late") <= 1


async def test_queue_timeout_and_bound_are_503_and_free_nothing() -> None:
    queue = FairQueue(lambda: 1, max_queued=1, timeout_s=0.05)
    await queue.acquire("a")
    waiter = asyncio.create_task(queue.acquire("b"))
    await asyncio.sleep(0)
    with pytest.raises(HTTPError) as full:
        await queue.acquire("c")
    assert full.value.status == 503 and full.value.code == "pool_saturated"
    with pytest.raises(HTTPError) as late:
        await waiter
    assert late.value.status == 503 and late.value.retry_after_s
    assert queue.queued == 0 and queue.inflight == 1
    cancelled = asyncio.create_task(queue.acquire("d"))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    queue.release()
    assert queue.inflight == 0 and queue.queued == 0


# ---------------------------------------------------------------- rates and policies
def test_rate_limits_refuse_with_retry_after_and_refill() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    policy = TenantPolicy(requests_per_minute=2, tokens_per_minute=1000)
    limiter.admit("t", policy, 10)
    limiter.admit("t", policy, 10)
    with pytest.raises(HTTPError) as exc:
        limiter.admit("t", policy, 10)
    assert exc.value.status == 429 and exc.value.code == "rate_limit_exceeded"
    assert exc.value.retry_after_s == 30
    limiter.admit("other", policy, 10)  # buckets are per tenant
    now[0] = 30.0
    limiter.admit("t", policy, 10)
    with pytest.raises(HTTPError, match="tokens per minute"):
        limiter.admit("u", TenantPolicy(tokens_per_minute=100), 60)
        limiter.admit("u", TenantPolicy(tokens_per_minute=100), 60)


def test_policies_from_the_pools_rate_limit_document() -> None:
    doc = {
        "version": 1,
        "perApiKey": {"requestsPerMinute": 60, "tokensPerMinute": 20000},
        "priority": 2,
        "fairShareWeight": 1.5,
        "tenants": {"team-a": {"fairShareWeight": 3, "requestsPerMinute": None}},
    }
    default, tenants = parse_policies(doc, "tenants.json")
    assert default == TenantPolicy(1.5, 60, 20000, 2)
    assert tenants["team-a"] == TenantPolicy(3.0, None, 20000, 2)
    with pytest.raises(ConfigError, match=r"tenants.team-b.fairShareWeight"):
        parse_policies({"tenants": {"team-b": {"fairShareWeight": 0}}}, "tenants.json")
    with pytest.raises(ConfigError, match=r"perApiKey.requestsPerMinute"):
        parse_policies({"perApiKey": {"requestsPerMinute": "many"}}, "tenants.json")


def test_callers_keys_and_anonymous_addresses(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    digest = hashlib.sha256(b"sk-a").hexdigest()
    keys.write_text(json.dumps({"keys": [{"tenant": "team-a", "sha256": digest, "priority": -1}]}))
    tenants = Tenants(api_keys_file=str(keys))
    assert tenants.identify("Bearer sk-a", "10.0.0.1") == Caller("team-a", "team-a", True, -1)
    for header in (None, "Bearer sk-b", "Basic sk-a", "Bearer "):
        with pytest.raises(HTTPError) as exc:
            tenants.identify(header, "10.0.0.1")
        assert exc.value.status == 401
    anon = Tenants()
    assert anon.identify("Bearer anything", "10.0.0.1").tenant == "ip:10.0.0.1"
    assert anonymous_tenant("2001:db8::1") == anonymous_tenant("2001:db8::ffff")
    assert anonymous_tenant("::ffff:10.0.0.1") == "ip:10.0.0.1"
    # priority: asked, never better than the key's grant or the tenant's floor
    caller = tenants.identify("Bearer sk-a", None)
    assert tenants.priority(caller, TenantPolicy(), {"priority": -5}) == -1
    assert tenants.priority(anon.identify(None, None), TenantPolicy(priority=3), {}) == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"keys": [{"tenant": "x", "sha256": "zz"}]}))
    with pytest.raises(ConfigError, match=r"keys\[0\].sha256"):
        Tenants(api_keys_file=str(bad))


def test_token_estimate() -> None:
    assert estimate_tokens({"max_tokens": 10}, "x" * 40) == 20
    assert estimate_tokens({"n": 2, "max_completion_tokens": 5}, "") == 10
    assert estimate_tokens({"max_tokens": "lots"}, "") == 256


# ---------------------------------------------------------------- through the gateway
def _key_files(tmp_path: Path) -> tuple[Path, Path]:
    keys = tmp_path / "keys.json"
    entries = [
        {"tenant": name, "sha256": hashlib.sha256(f"sk-{name}".encode()).hexdigest()}
        for name in ("heavy", "light", "blocker", "limited")
    ]
    keys.write_text(json.dumps({"keys": entries}))
    policies = tmp_path / "tenants.json"
    policies.write_text(
        json.dumps(
            {
                "version": 1,
                "fairShareWeight": 1.0,
                "tenants": {
                    "heavy": {"fairShareWeight": 3},
                    "limited": {"requestsPerMinute": 2},
                },
            }
        )
    )
    return keys, policies


def _body(model: str, max_tokens: int) -> dict[str, object]:
    return {
        "model": model,
        "prompt": "fair share",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }


def test_fair_share_between_two_tenants_follows_weights(tmp_path: Path) -> None:
    """Two replicas that answer only once the test opens a gate, one slot each: the first two
    requests take the slots and all 60 others queue whatever this machine's speed; the order
    the replicas then see them in is the fair queue's."""
    keys, policies = _key_files(tmp_path)
    gate = threading.Event()
    seen: list[str] = []

    async def gated(request: Request) -> Response:
        body = await request.json()
        while not gate.is_set():
            await asyncio.sleep(0.005)
        seen.append(body["user"])
        return JSONResponse(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6},
            }
        )

    with fake(gated) as a, fake(gated) as b:
        argv = ["--replica", a.url, "--replica", b.url]
        argv += ["--api-keys-file", str(keys), "--tenants-file", str(policies)]
        argv += ["--max-inflight-per-replica", "1", "--strategy", "least-load"]
        with GatewayServer(argv) as gw:
            fair = gw.core.fair
            assert fair is not None

            async def run() -> None:
                async with httpx.AsyncClient(base_url=gw.url, timeout=120) as client:

                    async def call(tenant: str) -> None:
                        body = {**_body("m", 4), "user": tenant}
                        r = await client.post(
                            "/v1/completions",
                            json=body,
                            headers={"Authorization": f"Bearer sk-{tenant}"},
                        )
                        assert r.status_code == 200, r.text

                    blockers = [asyncio.create_task(call("blocker")) for _ in range(2)]
                    while fair.inflight < 2:
                        await asyncio.sleep(0.005)
                    tasks = [asyncio.create_task(call("light")) for _ in range(30)]
                    tasks += [asyncio.create_task(call("heavy")) for _ in range(30)]
                    while fair.queued < 60:
                        await asyncio.sleep(0.005)
                    gate.set()
                    await asyncio.gather(*blockers, *tasks)

            asyncio.run(run())
    order = [t for t in seen if t != "blocker"]
    assert len(order) == 60
    # while both were backlogged (the first 40 served: heavy still had 30 waiting)
    window = order[:40]
    ratio = window.count("heavy") / max(1, window.count("light"))
    assert 3.0 * 0.8 <= ratio <= 3.0 * 1.2, (ratio, window)


def test_keys_and_rate_limits_at_the_gateway(workers: list[WorkerProcess], tmp_path: Path) -> None:
    keys, policies = _key_files(tmp_path)
    model = httpx.get(workers[0].url + "/v1/models").json()["data"][0]["id"]
    argv = [a for w in workers for a in ("--replica", w.url)]
    argv += ["--api-keys-file", str(keys), "--tenants-file", str(policies)]
    with GatewayServer(argv) as gw:
        anonymous = httpx.post(gw.url + "/v1/completions", json=_body(model, 1))
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer sk-limited"}
        statuses = [
            httpx.post(gw.url + "/v1/completions", json=_body(model, 1), headers=auth)
            for _ in range(3)
        ]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        refused = statuses[-1]
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        other = httpx.post(
            gw.url + "/v1/completions",
            json=_body(model, 1),
            headers={"Authorization": "Bearer sk-light"},
        )
        assert other.status_code == 200
        # its series name tenants: /metrics is behind the key on the API port
        assert httpx.get(gw.url + "/metrics").status_code == 401
        text = httpx.get(gw.url + "/metrics", headers=auth).text
        assert 'llmos_gateway_rate_limited_total{tenant="limited"} 1.0' in text
        assert 'tenant="light"' in text


def test_tenants_file_may_appear_later_and_bad_updates_keep_the_last(tmp_path: Path) -> None:
    path = tmp_path / "ratelimits.json"
    tenants = Tenants(tenants_file=str(path), reload_s=0.0)
    caller = Caller("team-a", "team-a", authenticated=True)
    assert tenants.policy(caller) == TenantPolicy()
    path.write_text(json.dumps({"tenants": {"team-a": {"fairShareWeight": 2}}}))
    assert tenants.policy(caller).weight == 2.0
    path.write_text(json.dumps({"tenants": {"team-a": {"fairShareWeight": -1}}, "pad": 1}))
    assert tenants.policy(caller).weight == 2.0  # refused update: the last good one stays
    with pytest.raises(ConfigError, match="cannot read"):
        Tenants(api_keys_file=str(tmp_path / "absent.json"))


async def test_metrics_port_serves_metrics_only_and_the_api_port_everything_else() -> None:
    from llmos_gateway.app import Gateway, build_app
    from llmos_gateway.replicas import Pool
    from llmos_gateway.routing import Router

    upstream = httpx.AsyncClient()
    app = build_app(Gateway(Pool(), Router(), upstream), metrics_port=9090)
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://gw:8000") as api,
        httpx.AsyncClient(transport=transport, base_url="http://gw:9090") as metrics,
    ):
        assert (await metrics.get("/metrics")).status_code == 200
        assert "llmos_gateway_replicas_ready" in (await metrics.get("/metrics")).text
        assert (await metrics.get("/health")).status_code == 404
        assert (await metrics.post("/v1/completions", json={})).status_code == 404
        assert (await api.get("/metrics")).status_code == 404
        assert (await api.get("/health")).status_code == 200
    await upstream.aclose()

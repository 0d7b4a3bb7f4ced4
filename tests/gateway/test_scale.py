"""Scale from zero and back, against the emulated Kubernetes API (kmock, as the operator tests).

A pool at zero replicas: a request is held, the gateway patches the InferencePool's
`spec.replicas` to its minimum, and the request is served once a replica joins the pool; past the
hold timeout a held request is a 503 with Retry-After; past the idle window the gateway asks for
zero replicas again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import kmock
import pytest

from llmos_gateway.app import Gateway, GatewaySettings, build_app
from llmos_gateway.kube import IdleWatcher, PoolScaler
from llmos_gateway.replicas import Pool, Replica
from llmos_gateway.routing import Router
from tests.gateway.conftest import WorkerProcess
from tests.operator.conftest import NS, ApiServer, Cluster


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    server = ApiServer()
    async with server, kmock.Server(server) as http_server:
        client = Cluster(server, str(http_server.url).rstrip("/"))
        yield client
        await client.http.aclose()


def pool_body(replicas: int, min_replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "llmos.dev/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": "chat", "namespace": NS},
        "spec": {
            "model": "tiny",
            "replicas": replicas,
            "autoscaling": {"enabled": True, "minReplicas": min_replicas, "maxReplicas": 4},
        },
    }


async def replicas_of(cluster: Cluster) -> int:
    body = await cluster.get("inferencepools", "chat")
    assert body is not None
    return int(body["spec"].get("replicas") or 0)


def gateway_at_zero(
    cluster: Cluster, upstream: httpx.AsyncClient, **settings: Any
) -> tuple[Gateway, PoolScaler, httpx.AsyncClient]:
    scaler = PoolScaler(cluster.http, cluster.url, NS, "chat")
    gw = Gateway(
        Pool(),
        Router("prefix"),
        upstream,
        settings=GatewaySettings(**settings),
        scale_up=scaler.scale_up,
    )
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_app(gw)), base_url="http://gw", timeout=60
    )
    return gw, scaler, client


async def test_hold_scale_up_and_release(cluster: Cluster, workers: list[WorkerProcess]) -> None:
    await cluster.create("inferencepools", pool_body(0, min_replicas=2))
    model = httpx.get(workers[0].url + "/v1/models").json()["data"][0]["id"]
    async with httpx.AsyncClient(timeout=60) as upstream:
        gw, _, client = gateway_at_zero(cluster, upstream, hold_timeout_s=60)
        body = {"model": model, "prompt": "held", "max_tokens": 3}
        held = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(3)]
        await cluster.wait_for(lambda: _eq(replicas_of(cluster), 2), what="the scale-up patch")
        assert not any(t.done() for t in held)  # still held: no replica yet
        assert gw.metrics.registry.get_sample_value("llmos_gateway_held_requests") == 3
        gw.pool.replace([Replica(name="w0", url=workers[0].url)])  # discovery: one is ready
        answers = await asyncio.gather(*held)
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert gw.metrics.registry.get_sample_value("llmos_gateway_held_requests") == 0
        sent = gw.metrics.registry.get_sample_value(
            "llmos_gateway_scale_requests_total", {"result": "sent"}
        )
        assert sent == 1  # one request for the three held ones
        await client.aclose()


async def _eq(value: Any, want: int) -> bool:
    return bool(await value == want)


async def test_hold_timeout_is_503_with_retry_after(cluster: Cluster) -> None:
    await cluster.create("inferencepools", pool_body(0))
    async with httpx.AsyncClient(timeout=60) as upstream:
        gw, _, client = gateway_at_zero(cluster, upstream, hold_timeout_s=0.2, retry_after_s=7)
        r = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "pool_scaling"
        # the scale-up was still asked for (its API calls may outlast the 0.2 s hold)
        await cluster.wait_for(lambda: _eq(replicas_of(cluster), 1), what="the scale-up patch")
        assert gw.metrics.registry.get_sample_value("llmos_gateway_hold_expired_total") == 1
        await client.aclose()


async def test_held_queue_is_bounded(cluster: Cluster) -> None:
    await cluster.create("inferencepools", pool_body(0))
    async with httpx.AsyncClient(timeout=60) as upstream:
        _, _, client = gateway_at_zero(cluster, upstream, hold_timeout_s=0.5, max_held=2)
        answers = await asyncio.gather(
            *(client.post("/v1/completions", json={"prompt": "x"}) for _ in range(4))
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [503] * 4
        full = [a for a in answers if "maximum" in a.json()["error"]["message"]]
        assert len(full) == 2  # two were refused at once, two were held until the timeout
        await client.aclose()


async def test_scale_up_leaves_a_pool_with_replicas_alone(cluster: Cluster) -> None:
    await cluster.create("inferencepools", pool_body(3))
    scaler = PoolScaler(cluster.http, cluster.url, NS, "chat")
    assert await scaler.scale_up()
    assert await replicas_of(cluster) == 3


async def test_idle_window_scales_to_zero(cluster: Cluster) -> None:
    await cluster.create("inferencepools", pool_body(2))
    scaler = PoolScaler(cluster.http, cluster.url, NS, "chat")
    now = [0.0]
    busy = [False]
    idle = IdleWatcher(scaler.scale_to_zero, lambda: busy[0], idle_s=30, clock=lambda: now[0])
    now[0] = 29
    assert not await idle.check()
    busy[0] = True  # a request in flight restarts the window
    now[0] = 40
    assert not await idle.check()
    busy[0] = False
    now[0] = 69
    assert not await idle.check()
    assert await replicas_of(cluster) == 2
    now[0] = 71
    assert await idle.check()
    assert await replicas_of(cluster) == 0
    assert not await idle.check()  # asked once per idle period
    idle.touch()
    now[0] = 200
    await cluster.patch("inferencepools", "chat", {"spec": {"replicas": 1}})
    assert await idle.check()
    assert await replicas_of(cluster) == 0

"""The builtin autoscaler inside the real kopf operator, against the kmock API server fixture.

The test plays the parts a cluster would: Pod objects (ready, with a loopback IP and their
`http` container port) stand for the pool's worker pods, and each points at a small real HTTP
server on loopback serving Prometheus text with a value the test sets. The operator scrapes
them over HTTP, decides, and writes `spec.replicas`, `status.autoscaling`, events and metrics.
Windows and the timer interval are shortened through the injected `AutoscalerSettings`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import pytest

from llmos_operator.autoscaling.decision import Decision
from llmos_operator.builders.pool import selector_labels
from llmos_operator.handlers import autoscaling
from llmos_operator.metrics import DecisionLike, OperatorMetrics
from tests.operator import conftest
from tests.operator.conftest import NS, Cluster

SETTINGS = autoscaling.AutoscalerSettings(interval_s=0.2, scrape_timeout_s=1.0, metrics_port=None)


class FakeWorker:
    """A loopback HTTP server whose /metrics reports `waiting` queued requests."""

    def __init__(self) -> None:
        self.waiting = 0.0
        self.port = 0
        self._runner: aiohttp.web.AppRunner | None = None

    async def _metrics(self, _: aiohttp.web.Request) -> aiohttp.web.Response:
        text = (
            "# TYPE llmos_num_requests_waiting gauge\n"
            f'llmos_num_requests_waiting{{model_name="m"}} {self.waiting}\n'
        )
        return aiohttp.web.Response(text=text, content_type="text/plain")

    async def start(self) -> FakeWorker:
        app = aiohttp.web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def add_pod(cluster: Cluster, pool: str, index: int, port: int) -> None:
    name = f"{pool}-pod-{index}"
    await cluster.create(
        "pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": selector_labels(pool)},
            "spec": {
                "containers": [
                    {
                        "name": "worker",
                        "image": "w",
                        "ports": [{"name": "http", "containerPort": port}],
                    }
                ]
            },
        },
    )
    ready = {"type": "Ready", "status": "True"}
    status = {"phase": "Running", "podIP": "127.0.0.1", "conditions": [ready]}
    await cluster.patch("pods", name, {"status": status}, sub="status")


def pool_body(name: str, replicas: int, **autoscaling_spec: Any) -> dict[str, Any]:
    spec = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 4,
        "metric": "requestsWaiting",
        "target": 2,
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 2,
        **autoscaling_spec,
    }
    return {
        "apiVersion": "llmos.dev/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": name},
        "spec": {"modelRef": "m", "replicas": replicas, "autoscaling": spec},
    }


class RecordingMetrics(OperatorMetrics):
    """The operator's metrics, also keeping each recommendation as the autoscaler made it: the
    pool, when (its `now`, on time.monotonic) and the bounded replicas. A scale-down window runs
    from the last recommendation above the new size, which a tick may make on a scrape from
    just before the load stopped; the test cannot see that moment from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.recommendations: list[tuple[str, float, int]] = []

    def record_decision(
        self, namespace: str, pool: str, metric: str, target: float, decision: DecisionLike
    ) -> None:
        assert isinstance(decision, Decision)
        latest = decision.state.recommendations[-1]
        self.recommendations.append((pool, latest.at, latest.replicas))
        super().record_decision(namespace, pool, metric, target, decision)

    def latest(self, pool: str) -> int | None:
        made = [n for p, _, n in list(self.recommendations) if p == pool]
        return made[-1] if made else None

    def last_above(self, pool: str, replicas: int) -> float:
        """When `pool` was last recommended more than `replicas` replicas."""
        return max(at for p, at, n in list(self.recommendations) if p == pool and n > replicas)


@pytest.fixture
async def metrics() -> RecordingMetrics:
    return RecordingMetrics()


@pytest.fixture
async def scaling_operator(cluster: Cluster, metrics: OperatorMetrics) -> AsyncIterator[None]:
    """The whole operator (its autoscaler ticking every 0.2 s), against the emulator."""
    process = conftest.OperatorProcess(
        conftest.test_config(cluster), autoscaler=SETTINGS, metrics=metrics
    )
    await process.start()
    yield
    await process.stop()


@pytest.fixture
async def workers() -> AsyncIterator[list[FakeWorker]]:
    started = [await FakeWorker().start() for _ in range(4)]
    yield started
    for worker in started:
        await worker.stop()


async def replicas_of(cluster: Cluster, name: str) -> int:
    body = await cluster.get("inferencepools", name)
    assert body is not None
    return int(body["spec"]["replicas"])


def events_of(cluster: Cluster, reason: str) -> list[dict[str, Any]]:
    return [
        obj.raw
        for (res, _, _), obj in cluster.server.objects.items()
        if res.plural == "events" and not obj.deleted and obj.raw.get("reason") == reason
    ]


async def test_scales_up_under_load_and_down_only_after_the_window(
    cluster: Cluster, scaling_operator: None, workers: list[FakeWorker], metrics: RecordingMetrics
) -> None:
    await cluster.create("inferencepools", pool_body("chat", 1))
    await add_pod(cluster, "chat", 0, workers[0].port)
    workers[0].waiting = 7  # 7 queued / target 2 per replica -> 4 replicas

    async def scaled_to(n: int) -> bool:
        return await replicas_of(cluster, "chat") == n

    await cluster.wait_for(lambda: scaled_to(4), timeout=10, what="scale up to 4")

    async def status_of_the_scale_up() -> dict[str, Any] | None:
        # why: the operator patches spec, then status (a second call): wait for the status too
        body = await cluster.get("inferencepools", "chat")
        status = ((body or {}).get("status") or {}).get("autoscaling") or {}
        return status if status.get("desiredReplicas") == 4 else None

    status = await cluster.wait_for(status_of_the_scale_up, timeout=10, what="the status")
    assert status["desiredReplicas"] == 4
    assert status["currentMetric"] == 7
    assert status["lastDecision"].startswith("MetricAboveTarget")
    assert status["lastScaleTime"]
    assert any("replicas 1 -> 4" in e["message"] for e in events_of(cluster, "ScaledUp"))

    # the "Deployment" brings the three new pods; the load stops everywhere
    for i in range(1, 4):
        await add_pod(cluster, "chat", i, workers[i].port)
    workers[0].waiting = 0

    async def idle_recommended() -> bool:
        return metrics.latest("chat") == 1

    # the window runs from the last recommendation made on the load (its scrape may be from
    # before the load stopped); it is final once a later one has seen the pool idle
    await cluster.wait_for(idle_recommended, timeout=10, what="a recommendation on the idle pool")
    last_load = metrics.last_above("chat", 1)
    await asyncio.sleep(max(0.0, last_load + 1.2 - time.monotonic()))
    assert await replicas_of(cluster, "chat") == 4, "fell before the 2 s window"
    await cluster.wait_for(lambda: scaled_to(1), timeout=10, what="scale down to 1")
    assert time.monotonic() - last_load >= 2.0
    assert events_of(cluster, "ScaledDown")

    text = metrics.render().decode()
    assert 'llmos_operator_autoscaler_decisions_total{direction="up"' in text
    assert 'llmos_operator_pool_desired_replicas{namespace="team-a",pool="chat"} 1.0' in text


async def test_unreachable_pods_are_unknown_not_idle(
    cluster: Cluster, scaling_operator: None, workers: list[FakeWorker]
) -> None:
    await cluster.create("inferencepools", pool_body("blind", 3, scaleDownStabilizationSeconds=0))
    await workers[1].stop()
    await workers[2].stop()
    # why: the idle pod last: a tick between the adds sees no answer and holds, where with the
    # idle pod alone (and the pool at 2) it would rightly go to 1
    await add_pod(cluster, "blind", 1, workers[1].port)  # nothing listens any more
    await add_pod(cluster, "blind", 2, workers[2].port)
    await add_pod(cluster, "blind", 0, workers[0].port)  # answers: idle

    async def decided() -> dict[str, Any] | None:
        body = await cluster.get("inferencepools", "blind")
        status = ((body or {}).get("status") or {}).get("autoscaling") or {}
        # a decision over all three pods (the ones before it saw no metrics at all)
        return status if "over 1 pod(s)" in status.get("lastDecision", "") else None

    await cluster.wait_for(decided, timeout=10, what="a decision over the three pods")
    await asyncio.sleep(1.0)
    # read as zero the pool would fall to 1; as unknown (at target) it keeps 2 of 3
    assert await replicas_of(cluster, "blind") == 2
    status = await decided()
    assert status is not None and "(2 unknown)" in status["lastDecision"]


async def test_never_scales_past_the_namespace_quota(
    cluster: Cluster, scaling_operator: None, workers: list[FakeWorker]
) -> None:
    await cluster.create(
        "quotapolicies",
        {
            "apiVersion": "llmos.dev/v1alpha1",
            "kind": "QuotaPolicy",
            "metadata": {"name": "small"},
            "spec": {"namespaceSelector": {}, "limits": {"totalReplicas": 2}},
        },
        namespace=None,  # type: ignore[arg-type]
    )
    await cluster.create("inferencepools", pool_body("capped", 1))
    await add_pod(cluster, "capped", 0, workers[0].port)
    workers[0].waiting = 50

    async def limited() -> bool:
        body = await cluster.get("inferencepools", "capped")
        status = ((body or {}).get("status") or {}).get("autoscaling") or {}
        return str(status.get("lastDecision", "")).startswith("LimitedByQuota")

    await cluster.wait_for(limited, timeout=10, what="a quota-limited decision")
    await asyncio.sleep(0.6)
    assert await replicas_of(cluster, "capped") == 2


async def test_hpa_mode_renders_the_hpa_and_leaves_replicas_alone(
    cluster: Cluster, scaling_operator: None
) -> None:
    await cluster.create("inferencepools", pool_body("ext", 2, mode="hpa", target=0.5))
    path = "/apis/autoscaling/v2/namespaces/" + NS + "/horizontalpodautoscalers/ext"

    async def hpa() -> dict[str, Any] | None:
        response = await cluster.http.get(path)
        return response.json() if response.status_code == 200 else None

    rendered = await cluster.wait_for(hpa, timeout=10, what="the HPA")
    assert rendered["spec"]["scaleTargetRef"] == {
        "apiVersion": "llmos.dev/v1alpha1",
        "kind": "InferencePool",
        "name": "ext",
    }
    (metric,) = rendered["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "llmos_num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "500m"}
    await asyncio.sleep(0.6)
    assert await replicas_of(cluster, "ext") == 2

    # a new target reaches the HPA (patched in place)
    await cluster.patch("inferencepools", "ext", {"spec": {"autoscaling": {"target": 3}}})

    async def retargeted() -> bool:
        got = await hpa() or {}
        [metric] = got.get("spec", {}).get("metrics") or [{}]
        return bool(metric.get("pods", {}).get("target", {}).get("averageValue") == "3")

    await cluster.wait_for(retargeted, timeout=10, what="the HPA patched")

    await cluster.patch("inferencepools", "ext", {"spec": {"autoscaling": {"enabled": False}}})

    async def gone() -> bool:
        return await hpa() is None

    await cluster.wait_for(gone, timeout=10, what="the HPA removed")

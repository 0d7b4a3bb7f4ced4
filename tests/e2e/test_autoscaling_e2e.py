"""End to end: real worker processes under load, scaled by the real operator on the emulator.

Two `llmos-worker serve` processes (the tiny random Llama) run on loopback; they are started up
front because a cold start costs seconds on this machine, and the test's "kubelet" loop then
plays Deployment + kubelet: for `spec.replicas = n` it keeps Pod objects 0..n-1 (ready, IP
127.0.0.1, `http` port = that worker's port) in the emulated API server and deletes the rest. A
bounded load generator (a fixed number of closed-loop clients, spread round-robin over the ready
pods as a Service would) drives the workers; the operator scrapes their real `/metrics`, raises
the pool's replicas under load and lowers them only after the scale-down window once it stops.
Takes about a minute on 2 busy cores (worker start-up dominates).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.operator.conftest import Cluster, cluster, operator_evidence  # noqa: F401
from tests.operator.test_autoscaling import (  # noqa: F401  (fixtures)
    RecordingMetrics,
    add_pod,
    metrics,
    pool_body,
    replicas_of,
    scaling_operator,
)
from tests.worker.conftest import smollm2_gguf, smollm2_tokenizer_dir, tiny_model_dir  # noqa: F401
from tests.worker.server_harness import free_port, start_worker_process, wait_ready

POOL = "e2e"
MAX_REPLICAS = 2
DOWN_WINDOW_S = 3.0
CLIENTS = 4


@pytest.fixture
def worker_ports(tiny_model_dir: Path, tmp_path: Path) -> Iterator[list[int]]:  # noqa: F811
    env = {
        "LLMOS_MODEL": str(tiny_model_dir),
        "LLMOS_SERVED_MODEL_NAME": "tiny",
        "LLMOS_KV_CACHE_MEMORY_BYTES": str(16 * 1024 * 1024),
        "LLMOS_MAX_NUM_SEQS": "4",
    }
    ports = [free_port() for _ in range(MAX_REPLICAS)]
    procs = [
        start_worker_process([], port=p, env=env, log_path=tmp_path / f"worker-{i}.log")
        for i, p in enumerate(ports)
    ]
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_ready(f"http://127.0.0.1:{port}", proc)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


class Kubelet:
    """Keeps Pod objects 0..spec.replicas-1 for the pool, each backed by a running worker."""

    def __init__(self, api: Cluster, ports: list[int]) -> None:
        self.cluster = api
        self.ports = ports
        self.ready: list[int] = []  # ports of the pods that exist now
        self.history: list[tuple[float, int]] = []  # (time, replicas) at every change

    async def run(self) -> None:
        while True:
            wanted = min(await replicas_of(self.cluster, POOL), len(self.ports))
            if not self.history or self.history[-1][1] != wanted:
                self.history.append((time.monotonic(), wanted))
            existing = set(self.cluster.names("pods"))
            for i in range(len(self.ports)):
                name = f"{POOL}-pod-{i}"
                if i < wanted and name not in existing:
                    await add_pod(self.cluster, POOL, i, self.ports[i])
                elif i >= wanted and name in existing:
                    await self.cluster.delete("pods", name)
            self.ready = self.ports[:wanted]
            await asyncio.sleep(0.1)


async def load(kubelet: Kubelet, stop: asyncio.Event, done: list[int]) -> None:
    """One closed-loop client: a completion at a time, to the next ready pod."""
    body: dict[str, Any] = {
        "model": "tiny",
        "prompt": "count with me",
        "max_tokens": 48,
        "temperature": 0,
        "ignore_eos": True,
    }
    turn = itertools.count()
    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            ports = kubelet.ready or kubelet.ports[:1]
            port = ports[next(turn) % len(ports)]
            response = await client.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
            if response.status_code == 200:
                done.append(port)
            else:
                await asyncio.sleep(0.05)


@pytest.fixture
async def kubelet(cluster: Cluster, worker_ports: list[int]) -> AsyncIterator[Kubelet]:  # noqa: F811
    await cluster.create(
        "inferencepools",
        pool_body(
            POOL,
            1,
            maxReplicas=MAX_REPLICAS,
            metric="requestsRunning",
            target=1.5,
            scaleDownStabilizationSeconds=DOWN_WINDOW_S,
        ),
    )
    k = Kubelet(cluster, worker_ports)
    task = asyncio.create_task(k.run())
    yield k
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_load_raises_replicas_and_idleness_lowers_them_after_the_window(
    cluster: Cluster,  # noqa: F811
    kubelet: Kubelet,
    scaling_operator: None,  # noqa: F811
    metrics: RecordingMetrics,  # noqa: F811
) -> None:
    async def at(n: int) -> bool:
        return await replicas_of(cluster, POOL) == n

    await asyncio.sleep(1.0)
    assert await replicas_of(cluster, POOL) == 1, "idle pool must not scale up"

    stop, done = asyncio.Event(), []
    clients = [asyncio.create_task(load(kubelet, stop, done)) for _ in range(CLIENTS)]
    try:
        await cluster.wait_for(lambda: at(MAX_REPLICAS), timeout=60, what="scale up under load")
        body = await cluster.get("inferencepools", POOL)
        assert body is not None and body["status"]["autoscaling"]["currentMetric"] > 0

        # load continues until it has reached every replica (a new pod turns ready first)
        async def spread() -> bool:
            return len(set(done)) == MAX_REPLICAS

        await cluster.wait_for(spread, timeout=30, what="the load on every replica")
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    await cluster.wait_for(lambda: at(1), timeout=30, what="scale down after the load")
    # why: the window runs from the last recommendation made under load, not from the moment
    # the last client returned: the load falls below target while the last requests finish
    waited = time.monotonic() - metrics.last_above(POOL, 1)

    # replicas never fell while loaded, and not before the window once idle
    counts = [n for _, n in kubelet.history]
    top = counts.index(MAX_REPLICAS)
    assert counts[: top + 1] == sorted(counts[: top + 1]), kubelet.history
    assert waited >= DOWN_WINDOW_S, f"fell after {waited:.1f}s, window {DOWN_WINDOW_S}s"

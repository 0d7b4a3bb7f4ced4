"""Failover with real worker processes: a replica killed mid-run costs no request that had not
started streaming, a stream already under way is never replayed elsewhere, and a client that
goes away aborts the generation on its replica.

The kill tests start their own pair of workers (one of them dies); the abort test uses the
session's pair.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import GatewayServer, WorkerProcess, start_workers
from tests.gateway.test_proxy import delta, served

LONG_GEN = {"max_tokens": 1800, "ignore_eos": True}


def worker_counter(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def aborted(url: str) -> float:
    return worker_counter(url, "llmos_request_success_total", finished_reason="abort")


def retries(gw: GatewayServer) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for f in gw.core.metrics.retries.collect()
        for s in f.samples
        if s.name.endswith("_total")
    }


def model_of(url: str) -> str:
    name: str = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
    return name


@pytest.fixture
def pair(tiny_model_dir: Path, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started = start_workers(2, tiny_model_dir, tmp_path)
    yield started
    for w in started:
        w.stop()


def gateway_over(workers: list[WorkerProcess], *extra: str) -> GatewayServer:
    argv = [a for w in workers for a in ("--replica", w.url)]
    return GatewayServer([*argv, "--scrape-interval", "0.2", *extra])


def test_killed_replica_costs_no_pending_request(pair: list[WorkerProcess]) -> None:
    """Non-streamed requests (nothing sent to the client before the end) keep arriving while
    one replica is killed: every one of them is answered 200, the failures were retried."""
    model = model_of(pair[0].url)
    victim = pair[0]
    results: list[int] = []

    with gateway_over(pair, "--strategy", "round-robin") as gw:

        def one(i: int) -> int:
            body = {"model": model, "prompt": f"request {i}", "max_tokens": 24}
            return httpx.post(gw.url + "/v1/completions", json=body, timeout=60).status_code

        with ThreadPoolExecutor(8) as ex:
            futures = [ex.submit(one, i) for i in range(16)]
            # kill once the victim is busy with some of them (and others are not sent yet)
            deadline = time.monotonic() + 30
            while not any(r.inflight for r in gw.core.pool.all() if r.url == victim.url):
                assert time.monotonic() < deadline
                time.sleep(0.005)
            victim.stop()
            futures += [ex.submit(one, i) for i in range(16, 40)]
            results = [f.result() for f in futures]
        reasons = retries(gw)
        assert httpx.get(gw.url + "/health").status_code == 200
    assert results == [200] * 40
    assert sum(reasons.values()) >= 1
    assert set(reasons) <= {"connect_error", "died_before_first_byte", "connect_timeout"}


def test_stream_under_way_is_not_replayed(pair: list[WorkerProcess]) -> None:
    """Tokens were sent from replica A when A dies: the client's stream ends there (no [DONE]),
    no retry is made and replica B never sees the request."""
    model = model_of(pair[0].url)
    with gateway_over(pair, "--strategy", "prefix") as gw:
        before = served(gw)
        body = {"model": model, "prompt": "a story", "stream": True, **LONG_GEN}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            (home,) = delta(before, served(gw))
            next(w for w in pair if w.url == home).stop()
            rest: list[str] = []
            with contextlib.suppress(httpx.HTTPError):  # a cut connection is also fine
                rest.extend(lines)
        assert "data: [DONE]" not in rest
        # an SSE stream cut upstream ends with an OpenAI-shaped error event
        assert any('"upstream_failed"' in line for line in rest), rest[-3:]
        assert delta(before, served(gw)) == {home: 1.0}
        assert retries(gw) == {}


def test_client_abort_aborts_upstream(workers: list[WorkerProcess]) -> None:
    model = model_of(workers[0].url)
    with gateway_over(workers, "--strategy", "prefix") as gw:
        before = served(gw)
        aborts = {w.url: aborted(w.url) for w in workers}
        body = {"model": model, "prompt": "go on and on", "stream": True, **LONG_GEN}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        (home,) = delta(before, served(gw))
        # the generation would end with reason "length"; an abort is the gateway's close
        deadline = time.monotonic() + 30
        while aborted(home) <= aborts[home]:
            assert time.monotonic() < deadline, "the replica kept generating for a gone client"
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while not gw.core.metrics.registry.get_sample_value("llmos_gateway_client_aborts_total"):
            assert time.monotonic() < deadline
            time.sleep(0.01)

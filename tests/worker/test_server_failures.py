"""Failure and refusal paths on a real server: engine death, a hang-up, API keys, rate limits.

The tiny model's real engine is wrapped to slow it down (so a request is surely still running when
its client leaves) or to make its step fail (as a CUDA error would), without changing the server.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos_worker.engine.params import SamplingParams
from llmos_worker.errors import ModelLoadError
from llmos_worker.server.async_engine import AsyncEngine, Sink
from llmos_worker.server.auth import ApiKeyAuth, hash_key
from llmos_worker.server.ratelimit import RateLimiter, RateLimits
from tests.worker.server_harness import InProcessServer, WrappedEngine, engine_factory


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hello", "temperature": 0, "ignore_eos": True, **fields}


def test_engine_failure_ends_streams_and_turns_not_ready(tiny_model_dir: Path) -> None:
    build = engine_factory(str(tiny_model_dir))
    with InProcessServer(
        lambda: WrappedEngine(build(), fail_after=5), served_model_name="tiny"
    ) as srv:
        events = []
        with httpx.stream(
            "POST", srv.url + "/v1/completions", json=body(max_tokens=50, stream=True), timeout=30
        ) as resp:
            assert resp.status_code == 200
            events = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][len("data: ") :])["error"]
        assert "engine stopped" in error["message"]
        assert httpx.get(srv.url + "/ready").status_code == 503
        assert httpx.get(srv.url + "/health").status_code == 503
        after = httpx.post(srv.url + "/v1/completions", json=body(max_tokens=2))
        assert after.status_code == 503
        assert after.json()["error"]["type"] == "service_unavailable_error"


def test_non_streaming_client_hanging_up_aborts_its_request(tiny_model_dir: Path) -> None:
    build = engine_factory(str(tiny_model_dir))
    with InProcessServer(
        lambda: WrappedEngine(build(), step_delay_s=0.02), served_model_name="tiny"
    ) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json=body(max_tokens=400), timeout=1.0)
        front = srv.state.front
        assert front is not None
        deadline = time.monotonic() + 10
        while front.num_inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert front.num_inflight == 0
        while time.monotonic() < deadline:
            stats = front.snapshot()
            if stats is not None and stats.num_running == 0 and stats.kv_cache_usage == 0.0:
                break
            time.sleep(0.05)
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'llmos_request_success_total{finished_reason="abort",model_name="tiny"} 1.0' in (
            metrics
        )
        assert 'llmos_kv_cache_usage_perc{model_name="tiny"} 0.0' in metrics
        assert httpx.get(srv.url + "/ready").status_code == 200


def test_api_keys_guard_the_openai_routes(tiny_model_dir: Path) -> None:
    auth = ApiKeyAuth({hash_key("secret-a"): "team-a"})
    with InProcessServer(
        engine_factory(str(tiny_model_dir)), served_model_name="tiny", auth=auth
    ) as srv:
        url = srv.url + "/v1/completions"
        missing = httpx.post(url, json=body(max_tokens=1))
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.post(url, json=body(max_tokens=1), headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401
        ok = httpx.post(url, json=body(max_tokens=1), headers={"Authorization": "Bearer secret-a"})
        assert ok.status_code == 200, ok.text
        assert httpx.get(srv.url + "/ready").status_code == 200  # probes need no key


def test_rate_limits_answer_429_per_key_and_refund_unused_tokens(tiny_model_dir: Path) -> None:
    limits = RateLimits.from_document(
        {"perApiKey": {"requestsPerMinute": 2, "tokensPerMinute": 1000}, "priority": 0}
    )
    limiter = RateLimiter(limits)
    # why: buckets are per authenticated tenant; unauthenticated callers share one per address
    auth = ApiKeyAuth({hash_key(key): key for key in ("a", "b", "probe", "c")})
    with InProcessServer(
        engine_factory(str(tiny_model_dir)), served_model_name="tiny", limiter=limiter, auth=auth
    ) as srv:

        def call(key: str, **fields: Any) -> httpx.Response:
            payload = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0, **fields}
            return httpx.post(
                srv.url + "/v1/completions",
                json=payload,
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )

        assert call("a").status_code == 200
        assert call("a").status_code == 200
        third = call("a")
        assert third.status_code == 429
        assert third.json()["error"]["type"] == "rate_limit_error"
        assert int(third.headers["retry-after"]) >= 1
        assert call("b").status_code == 200  # another key has its own buckets

        # a request reserves prompt + max_tokens, and gets back what it did not use: make one
        # that reserves ~900 tokens but stops after its first token
        first = call("probe", max_tokens=1).json()["choices"][0]["text"]
        assert first, "the greedy first token decodes to text"
        short = call("c", max_tokens=900, stop=[first]).json()
        assert short["choices"][0]["finish_reason"] == "stop"
        used = short["usage"]["total_tokens"]
        assert used < 50
        assert limiter.check("tenant:c", 1000 - used - 2) is None  # without the refund: ~100 left


def test_probes_while_the_model_loads(tiny_model_dir: Path) -> None:
    release = threading.Event()
    build = engine_factory(str(tiny_model_dir))

    def slow_loader() -> Any:
        assert release.wait(60)
        return build()

    with InProcessServer(slow_loader, served_model_name="tiny", wait_ready=False) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # alive: do not restart me
        loading = httpx.get(srv.url + "/ready")
        assert loading.status_code == 503 and "loading" in loading.json()["error"]["message"]
        early = httpx.post(srv.url + "/v1/completions", json=body(max_tokens=1))
        assert early.status_code == 503
        release.set()
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(srv.url + "/v1/completions", json=body(max_tokens=1)).status_code == 200


def test_a_failed_load_is_reported_by_the_probes() -> None:
    def broken_loader() -> Any:
        raise ModelLoadError("no model file at /models/missing.gguf")

    with InProcessServer(broken_loader, wait_ready=False) as srv:
        deadline = time.monotonic() + 10
        while srv.state.load_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503
        assert "missing.gguf" in ready.json()["error"]["message"]
        refused = httpx.post(srv.url + "/v1/completions", json=body(max_tokens=1))
        assert refused.status_code == 503
        assert "missing.gguf" in refused.json()["error"]["message"]


async def test_a_caller_cancelled_while_its_request_is_queued_leaves_nothing_behind(
    tiny_model_dir: Path,
) -> None:
    gate = threading.Event()
    engine = engine_factory(str(tiny_model_dir))()

    class GatedEngine(WrappedEngine):
        def add_request(self, *args: Any, **kwargs: Any) -> None:
            assert gate.wait(30)  # the engine thread is busy, as under load
            self._engine.add_request(*args, **kwargs)

    front = AsyncEngine(GatedEngine(engine))
    front.start()
    try:
        sink: Sink = asyncio.Queue()
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        task = asyncio.create_task(front.add(["r1"], ["hello"], params, sink))
        await asyncio.sleep(0.05)
        assert front.num_inflight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert front.num_inflight == 0
        gate.set()  # the engine now accepts the request, then processes the abort behind it
        deadline = time.monotonic() + 10
        while True:
            stats = front.snapshot()
            if (
                stats is not None
                and stats.num_running + stats.num_waiting == 0
                and (stats.kv_cache_usage == 0.0)
            ):
                break
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.02)
        assert sink.empty()  # nothing was delivered for the cancelled request
    finally:
        gate.set()
        await front.shutdown()

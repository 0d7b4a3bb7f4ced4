"""vLLM's metric names, with only the prefix changed, from a real server on the tiny model.

A Grafana dashboard or KEDA/HPA rule written for vLLM works after `vllm:` -> `llmos_`; HTTP
requests are counted by status class, refused ones included; `prompt_tokens_total` counts whole
prompts and the cached part is counted apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.worker.server_harness import InProcessServer, engine_factory

# the series vLLM's reference Grafana dashboard, its docs and common KEDA/HPA rules read
VLLM_SERIES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_requests_swapped",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
    "vllm:request_max_num_generation_tokens_bucket",
    "vllm:request_params_n_bucket",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:time_per_output_token_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
    "vllm:request_prefill_time_seconds_bucket",
    "vllm:request_decode_time_seconds_bucket",
    "vllm:request_inference_time_seconds_bucket",
]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[InProcessServer]:
    with InProcessServer(engine_factory(str(tiny_model_dir))) as srv:
        yield srv


def scrape(server: InProcessServer) -> str:
    return httpx.get(server.url + "/metrics").text


def value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert match is not None, series
    return float(match.group(1))


def test_vllm_series_exist_with_the_prefix_changed(server: InProcessServer) -> None:
    body = {"model": server.model, "prompt": "Hello there", "max_tokens": 4, "n": 2}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 200
    text = scrape(server)
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    missing = [s for s in VLLM_SERIES if s.replace("vllm:", "llmos_") not in names]
    assert missing == []


def test_http_requests_are_counted_by_status_class(server: InProcessServer) -> None:
    url = server.url + "/v1/completions"
    before = scrape(server)
    ok = {"model": server.model, "prompt": "Hi", "max_tokens": 1}
    assert httpx.post(url, json=ok).status_code == 200
    for bad in (
        {"model": server.model, "prompt": "Hi", "n": "x"},
        {"model": "nope", "prompt": "x"},
    ):
        assert httpx.post(url, json=bad).status_code in (400, 404)
    assert httpx.get(server.url + "/v1/frobnicate").status_code == 404
    after = scrape(server)

    def count(text: str, handler: str, status: str) -> float:
        method = "GET" if handler == "none" else "POST"
        labels = f'handler="{handler}",method="{method}",status="{status}"'
        series = f"llmos_http_requests_total{{{labels}}}"
        return float(text.split(series + " ")[1].split()[0]) if series in text else 0.0

    assert count(after, "/v1/completions", "2xx") - count(before, "/v1/completions", "2xx") == 1
    assert count(after, "/v1/completions", "4xx") - count(before, "/v1/completions", "4xx") == 2
    assert count(after, "none", "4xx") - count(before, "none", "4xx") == 1


def test_prompt_tokens_count_whole_prompts_and_cached_ones_apart(server: InProcessServer) -> None:
    prompt = list(range(300, 300 + 70))  # four full blocks of 16 and a partial one
    body = {"model": server.model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    before = scrape(server)
    for _ in range(2):
        assert httpx.post(server.url + "/v1/completions", json=body).status_code == 200
    after = scrape(server)

    def delta(series: str) -> float:
        return value(after, series) - value(before, series)

    assert delta("llmos_prompt_tokens_total") == 140
    assert delta("llmos_prompt_tokens_cached_total") == 64  # the second run's four blocks
    assert delta("llmos_prompt_tokens_computed_total") == 140 - 64

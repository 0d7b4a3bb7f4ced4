"""Prometheus metrics with vLLM's meanings, prefixed `llmos_`, labelled `model_name`.

A private `CollectorRegistry` (never the process-global one, so two servers in one test process
do not collide). Gauges and engine counters are read at scrape time from the latest
`EngineStats` snapshot, which the engine thread publishes after every step (a custom collector:
the engine itself is never touched from the HTTP side). Per-request histograms and the success
counter are observed by the engine thread as outputs arrive, from the engine's own monotonic
timestamps (`RequestMetrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmos_worker.engine.outputs import EngineStats, RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; the same spread as vLLM's buckets (sub-millisecond steps up to multi-minute requests)
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_TOKEN_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_REQUEST_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


# token counts per request: 1-2-5 steps, as vLLM's buckets (up to a million-token context)
_TOKEN_COUNT_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))
_N_BUCKETS = (1, 2, 5, 10, 20)


class HttpMetrics:
    """HTTP requests by route, method and status class (`2xx`, `4xx`, ...), as vLLM's
    instrumentator counts them, so refused requests (400, 401, 429, 503) are visible too."""

    ROUTES = frozenset(
        {
            "/v1/completions",
            "/v1/chat/completions",
            "/v1/embeddings",
            "/v1/models",
            "/tokenize",
            "/detokenize",
            "/health",
            "/ready",
            "/metrics",
        }
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "llmos_http_requests",
            "HTTP requests by handler, method and status class.",
            ["handler", "method", "status"],
            registry=registry,
        )

    @classmethod
    def handler(cls, path: str) -> str:
        """The route template (bounded label values; unknown paths are `none`)."""
        if path in cls.ROUTES:
            return path
        if path.startswith("/v1/models/"):
            return "/v1/models/{model_id}"
        return "none"

    def observe(self, path: str, method: str, status: int) -> None:
        method = method if method in ("GET", "POST", "HEAD", "OPTIONS") else "other"
        self.requests.labels(self.handler(path), method, f"{status // 100}xx").inc()


class _EngineStatsCollector(Collector):
    """Gauges and cumulative counters from the latest engine snapshot, at scrape time."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineStats | None]) -> None:
        self._model_name = model_name
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot()
        if stats is None:
            return
        labels = [self._model_name]

        def gauge(name: str, doc: str, value: float) -> Metric:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> Metric:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        yield gauge(
            "llmos_num_requests_running", "Requests in the running batch.", stats.num_running
        )
        yield gauge(
            "llmos_num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting
        )
        yield gauge(
            "llmos_kv_cache_usage_perc",
            "Fraction of KV-cache blocks held by live requests (1 = full).",
            stats.kv_cache_usage,
        )
        yield gauge(
            "llmos_gpu_cache_usage_perc",
            "The same as kv_cache_usage_perc, under vLLM's older name (dashboards, KEDA rules).",
            stats.kv_cache_usage,
        )
        yield gauge(
            "llmos_num_requests_swapped",
            "Requests swapped out (always 0: preemption recomputes).",
            stats.num_swapped,
        )
        yield gauge(
            "llmos_kv_cache_total_blocks",
            "KV-cache blocks allocated at start-up.",
            stats.num_total_blocks,
        )
        yield counter(
            "llmos_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            stats.prefix_cache_queries,
        )
        yield counter(
            "llmos_prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            stats.prefix_cache_hits,
        )
        yield counter(
            "llmos_num_preemptions",
            "Preemptions (recompute) of running requests.",
            stats.num_preemptions,
        )
        yield counter(
            "llmos_prompt_tokens",
            "Prompt tokens of requests whose prefill finished (cached ones included).",
            stats.prompt_tokens,
        )
        yield counter(
            "llmos_prompt_tokens_cached",
            "Of prompt_tokens, those found in the prefix cache.",
            stats.cached_prompt_tokens,
        )
        yield counter(
            "llmos_prompt_tokens_computed",
            "Prompt tokens run through the model (recomputation after preemption included).",
            stats.computed_prompt_tokens,
        )
        yield counter("llmos_generation_tokens", "Tokens generated.", stats.generation_tokens)


class ServerMetrics:
    """The worker's metrics; `observe_step` / `observe_abort` are called by the engine thread."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineStats | None]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineStatsCollector(model_name, snapshot))
        label = ["model_name"]
        self.request_success = Counter(
            "llmos_request_success",
            "Finished requests, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "llmos_time_to_first_token_seconds",
            "Arrival to first generated token.",
            label,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "llmos_inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            label,
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "llmos_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            label,
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "llmos_e2e_request_latency_seconds",
            "Arrival to finish.",
            label,
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "llmos_request_queue_time_seconds",
            "Arrival to first scheduled.",
            label,
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.prefill_time = Histogram(
            "llmos_request_prefill_time_seconds",
            "First scheduled to first token.",
            label,
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.decode_time = Histogram(
            "llmos_request_decode_time_seconds",
            "First token to last token.",
            label,
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.inference_time = Histogram(
            "llmos_request_inference_time_seconds",
            "First scheduled to last token.",
            label,
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.prompt_len = Histogram(
            "llmos_request_prompt_tokens",
            "Prompt tokens per finished request.",
            label,
            buckets=_TOKEN_COUNT_BUCKETS,
            registry=self.registry,
        )
        self.generation_len = Histogram(
            "llmos_request_generation_tokens",
            "Generated tokens per finished request (all its completions).",
            label,
            buckets=_TOKEN_COUNT_BUCKETS,
            registry=self.registry,
        )
        self.max_generation_len = Histogram(
            "llmos_request_max_num_generation_tokens",
            "Tokens of the longest completion per finished request.",
            label,
            buckets=_TOKEN_COUNT_BUCKETS,
            registry=self.registry,
        )
        self.params_n = Histogram(
            "llmos_request_params_n",
            "The n of finished requests.",
            label,
            buckets=_N_BUCKETS,
            registry=self.registry,
        )
        # request id -> (last token time seen, tokens seen): for inter-token latency
        self._progress: dict[str, tuple[float, int]] = {}

    def observe_step(self, output: RequestOutput) -> None:
        """Observe one request's progress after a step (engine thread)."""
        m = output.metrics
        tokens = sum(len(c.token_ids) for c in output.outputs)
        prev = self._progress.get(output.request_id)
        if m.last_token_time is not None and prev is not None and tokens > prev[1]:
            self.itl.labels(self.model_name).observe(max(0.0, m.last_token_time - prev[0]))
        if m.last_token_time is not None:
            self._progress[output.request_id] = (m.last_token_time, tokens)
        if not output.finished:
            return
        self._progress.pop(output.request_id, None)
        reason = output.outputs[0].finish_reason if output.outputs else None
        self.request_success.labels(self.model_name, reason or "stop").inc()
        if m.first_token_time is not None:
            self.ttft.labels(self.model_name).observe(max(0.0, m.first_token_time - m.arrival_time))
            generated = max((len(c.token_ids) for c in output.outputs), default=0)
            if m.last_token_time is not None and generated > 1:
                self.tpot.labels(self.model_name).observe(
                    max(0.0, m.last_token_time - m.first_token_time) / (generated - 1)
                )
        name = self.model_name
        self.prompt_len.labels(name).observe(len(output.prompt_token_ids))
        lengths = [len(c.token_ids) for c in output.outputs] or [0]
        self.generation_len.labels(name).observe(sum(lengths))
        self.max_generation_len.labels(name).observe(max(lengths))
        self.params_n.labels(name).observe(len(output.outputs))
        first, last, scheduled = m.first_token_time, m.last_token_time, m.first_scheduled_time
        if first is not None and scheduled is not None:
            self.prefill_time.labels(name).observe(max(0.0, first - scheduled))
        if first is not None and last is not None:
            self.decode_time.labels(name).observe(max(0.0, last - first))
        if last is not None and scheduled is not None:
            self.inference_time.labels(name).observe(max(0.0, last - scheduled))
        if m.finished_time is not None:
            self.e2e.labels(self.model_name).observe(max(0.0, m.finished_time - m.arrival_time))
        if m.first_scheduled_time is not None:
            self.queue_time.labels(self.model_name).observe(
                max(0.0, m.first_scheduled_time - m.arrival_time)
            )

    def observe_abort(self, request_id: str) -> None:
        """A request aborted before finishing (client gone, shutdown)."""
        self._progress.pop(request_id, None)
        self.request_success.labels(self.model_name, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

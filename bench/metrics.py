"""Latency and throughput metrics, defined as `vllm bench serve` defines them.

Per request (times in seconds, from one monotonic clock):
- TTFT  = first output chunk's arrival − request send time;
- E2EL  = last chunk's arrival − send time;
- TPOT  = (E2EL − TTFT) / (output tokens − 1), only for requests with more than one output token;
- ITL   = every gap between consecutive chunks of a request, pooled over all requests.
Aggregates are mean, median, std and percentiles (numpy's linear interpolation), reported in ms;
output throughput = all output tokens / benchmark duration (first send to last arrival).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestTiming:
    """What one request's client saw: when it was sent and when each output chunk arrived."""

    request_id: str
    prompt_len: int
    send_time: float
    chunk_times: list[float] = field(default_factory=list)  # one per streamed chunk (>= 1 token)
    output_len: int = 0  # output tokens received in total
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.output_len > 0 and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send_time

    @property
    def e2el(self) -> float:
        return self.chunk_times[-1] - self.send_time

    @property
    def tpot(self) -> float | None:
        if self.output_len <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_len - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


def summarize(
    values_s: Sequence[float], percentiles: Iterable[float] = PERCENTILES
) -> dict[str, float]:
    """mean / median / std / p<q> of a sample given in seconds, returned in milliseconds.

    An empty sample gives zeros, as vLLM reports it (`np.mean(x or 0)`).
    """
    arr = np.asarray(values_s if len(values_s) else [0.0], dtype=np.float64) * 1000.0
    out = {
        "mean_ms": float(arr.mean()),
        "median_ms": float(np.median(arr)),
        "std_ms": float(arr.std()),
    }
    for q in percentiles:
        out[f"p{q:g}_ms"] = float(np.percentile(arr, q))
    return out


def serving_metrics(
    timings: Sequence[RequestTiming], duration_s: float | None = None
) -> dict[str, Any]:
    """The `vllm bench serve` result block for a set of request timings.

    `duration_s` defaults to first send → last chunk over the successful requests.
    """
    done = [t for t in timings if t.ok]
    if duration_s is None:
        duration_s = (
            max(t.chunk_times[-1] for t in done) - min(t.send_time for t in done) if done else 0.0
        )
    out_tokens = sum(t.output_len for t in done)
    in_tokens = sum(t.prompt_len for t in done)
    tpots = [tp for t in done if (tp := t.tpot) is not None]
    itls = [gap for t in done for gap in t.itls]

    def rate(n: int) -> float:
        return n / duration_s if duration_s and duration_s > 0 else 0.0

    return {
        "completed": len(done),
        "failed": len(timings) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": rate(len(done)),
        "output_throughput": rate(out_tokens),
        "total_token_throughput": rate(out_tokens + in_tokens),
        "ttft": summarize([t.ttft for t in done]),
        "tpot": summarize(tpots),
        "itl": summarize(itls),
        "e2el": summarize([t.e2el for t in done]),
    }


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Of repeated runs of one workload, the run with the median output throughput (the lower
    middle one for an even count), with every run's throughput under "repeats".

    Why: single-stream numbers on a shared host swing by a third between runs a minute apart; a
    median of a few back-to-back runs is robust to one outlier, where a single run is not."""
    if not runs:
        raise ValueError("no runs")
    ordered = sorted(runs, key=lambda r: r["output_throughput"])
    return ordered[(len(ordered) - 1) // 2] | {"repeats": [r["output_throughput"] for r in runs]}


def kv_waste(allocated_slots: int, used_slots: int) -> float:
    """Fraction of allocated KV slots holding no token: (allocated − used) / allocated."""
    if allocated_slots <= 0:
        return 0.0
    if not 0 <= used_slots <= allocated_slots:
        raise ValueError(f"used slots {used_slots} outside [0, {allocated_slots}]")
    return (allocated_slots - used_slots) / allocated_slots


def speedup(ours: float, theirs: float) -> float | None:
    """ours / theirs, or None when the baseline is missing or zero."""
    return ours / theirs if theirs else None

"""Scraping of worker pods' Prometheus `/metrics` for the builtin autoscaler.

Every target is fetched concurrently through one injected `httpx.AsyncClient` (tests hand in a
client over real loopback or a mock transport), each with its own timeout and a cap on the body
size. A pod that does not answer, answers non-200, sends text that does not parse, or lacks the
series comes back as `value=None` (unknown) with the reason in `error` — never as 0, because an
unreachable pod is not an idle one. The text is parsed with `prometheus_client.parser`; the value
of a series in one pod is the sum over its label sets (one pod serves one model, so in practice
that is the single `model_name` sample), optionally filtered by `model_name`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

# The InferencePool's `autoscaling.metric` -> the worker's gauge (llmos_worker.server.metrics).
METRIC_SERIES: Mapping[str, str] = {
    "kvCacheUsage": "llmos_kv_cache_usage_perc",
    "requestsWaiting": "llmos_num_requests_waiting",
    "requestsRunning": "llmos_num_requests_running",
}

MAX_BODY_BYTES = 4 * 1024 * 1024  # why: a worker's /metrics is a few KiB; refuse a runaway pod


@dataclass(frozen=True)
class ScrapeTarget:
    """One pod to scrape: its name (for status/logs) and the full URL of its metrics page."""

    pod: str
    url: str


@dataclass(frozen=True)
class ScrapeResult:
    """One pod's value of the series, or None with the reason it is unknown."""

    pod: str
    value: float | None
    error: str | None = None


def series_for(metric: str) -> str:
    """The worker series behind an `autoscaling.metric` name; KeyError names the valid ones."""
    try:
        return METRIC_SERIES[metric]
    except KeyError:
        raise KeyError(
            f"autoscaling.metric {metric!r} is not one of {sorted(METRIC_SERIES)}"
        ) from None


def parse_value(text: str, series: str, model_name: str | None = None) -> float | None:
    """Sum of `series` samples in Prometheus text `text`; None if absent or not finite.

    Raises ValueError if the text is not Prometheus exposition format.
    """
    total: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != series:
                continue
            if model_name is not None and sample.labels.get("model_name") != model_name:
                continue
            if not math.isfinite(sample.value):
                return None
            total = (total or 0.0) + sample.value
    return total


async def _fetch(client: httpx.AsyncClient, url: str, timeout: float) -> str:
    async with client.stream("GET", url, timeout=timeout) as response:
        if response.status_code != 200:
            raise httpx.HTTPStatusError(
                f"HTTP {response.status_code}", request=response.request, response=response
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ValueError(f"metrics body over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


async def scrape_one(
    client: httpx.AsyncClient,
    target: ScrapeTarget,
    series: str,
    *,
    timeout: float = 2.0,
    model_name: str | None = None,
) -> ScrapeResult:
    """One pod's value; every failure becomes an unknown value with its reason."""
    try:
        # why: the overall deadline also bounds a pod that trickles bytes under the read timeout
        text = await asyncio.wait_for(_fetch(client, target.url, timeout), timeout=timeout * 2)
        value = parse_value(text, series, model_name)
    except (httpx.HTTPError, ValueError, TimeoutError) as exc:
        return ScrapeResult(target.pod, None, f"{type(exc).__name__}: {exc}"[:200])
    if value is None:
        return ScrapeResult(target.pod, None, f"series {series} missing or not finite")
    return ScrapeResult(target.pod, value)


async def scrape(
    client: httpx.AsyncClient,
    targets: Sequence[ScrapeTarget],
    series: str,
    *,
    timeout: float = 2.0,
    concurrency: int = 32,
    model_name: str | None = None,
) -> list[ScrapeResult]:
    """All targets' values, in target order, at most `concurrency` requests in flight."""
    gate = asyncio.Semaphore(max(concurrency, 1))

    async def bounded(target: ScrapeTarget) -> ScrapeResult:
        async with gate:
            return await scrape_one(client, target, series, timeout=timeout, model_name=model_name)

    return list(await asyncio.gather(*(bounded(t) for t in targets)))


def values_of(results: Iterable[ScrapeResult]) -> tuple[float | None, ...]:
    """The per-pod values in the shape `decision.Observation` takes."""
    return tuple(r.value for r in results)

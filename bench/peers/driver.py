"""One httpx async client that drives every system with the same streaming /v1/completions
requests, and the per-run statistics.

A streamed chunk whose text is non-empty is a token arrival (as `vllm bench serve` counts them);
the output length is the server's `usage.completion_tokens` when it sends usage (llama-server:
`timings.predicted_n` of its last chunk), else the number of such chunks. A request whose output
length differs from its `max_tokens` is counted as a length mismatch: the systems must produce
the same tokens for their numbers to compare.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import httpx

from bench.metrics import RequestTiming, serving_metrics
from bench.peers.systems import Kind, request_body
from bench.workload import BenchRequest


def parse_event(data: str) -> tuple[str, int | None]:
    """(text of the first choice, output token count if the event reports one) of one SSE
    `data:` payload."""
    msg = json.loads(data)
    count: int | None = None
    usage = msg.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        count = int(usage["completion_tokens"])
    timings = msg.get("timings")
    if count is None and isinstance(timings, dict) and timings.get("predicted_n") is not None:
        count = int(timings["predicted_n"])
    choices = msg.get("choices") or []
    text = ""
    if choices and isinstance(choices[0], dict):
        text = str(choices[0].get("text") or "")
    return text, count


async def stream_one(
    client: httpx.AsyncClient, base: str, kind: Kind, model: str, req: BenchRequest
) -> RequestTiming:
    """Send one request and time its chunks; errors are recorded, never raised."""
    body = request_body(kind, model, req.prompt_token_ids, req.max_tokens)
    timing = RequestTiming(req.request_id, req.prompt_len, time.perf_counter())
    chunks, reported = 0, None
    try:
        async with client.stream("POST", base + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                timing.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return timing
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                text, count = parse_event(data)
                if count is not None:
                    reported = count
                if text:
                    timing.chunk_times.append(now)
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    timing.output_len = reported if reported is not None else chunks
    return timing


async def run_requests(
    client: httpx.AsyncClient, base: str, kind: Kind, model: str, requests: Sequence[BenchRequest]
) -> tuple[list[RequestTiming], float]:
    """All requests at once (each scenario's requests arrive together); (timings, wall s)."""
    t0 = time.perf_counter()
    timings = await asyncio.gather(*(stream_one(client, base, kind, model, r) for r in requests))
    return list(timings), time.perf_counter() - t0


def decode_rate(t: RequestTiming) -> float:
    """Decode tokens per second of one request: tokens after the first over the time after the
    first chunk (0 when there is nothing to divide)."""
    if not t.ok or t.output_len <= 1 or len(t.chunk_times) < 2:
        return 0.0
    span = t.chunk_times[-1] - t.chunk_times[0]
    return (t.output_len - 1) / span if span > 0 else 0.0


def run_stats(
    timings: Sequence[RequestTiming], requests: Sequence[BenchRequest], wall_s: float
) -> dict[str, Any]:
    """One scenario run of one system: the `vllm bench serve` block (bench.metrics) plus the
    decode rate, the wall time and the count of requests whose output length was not the one
    asked for."""
    asked = {r.request_id: r.max_tokens for r in requests}
    out = serving_metrics(timings)
    out["wall_s"] = wall_s
    out["length_mismatches"] = sum(
        1 for t in timings if t.ok and t.output_len != asked.get(t.request_id, t.output_len)
    )
    rates = [decode_rate(t) for t in timings if t.ok]
    out["decode_tok_s_mean"] = sum(rates) / len(rates) if rates else 0.0
    errors = sorted({t.error for t in timings if t.error})
    out["errors"] = errors[:3]
    return out

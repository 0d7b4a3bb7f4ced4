"""Online workload: the real `llmos-worker serve` process, driven over loopback HTTP with
streaming `/v1/completions` requests sent at their Poisson arrival times.

Each request carries its prompt as token ids, `temperature=0`, `ignore_eos=true` and its
`max_tokens`. A chunk whose `text` is non-empty is a token arrival (as `vllm bench serve` counts
them); the output length is the server's `usage.completion_tokens` when it sends usage, else the
number of such chunks. The server runs as a subprocess on a free loopback port and is stopped at
the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.metrics import RequestTiming
from bench.workload import BenchRequest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def worker_server(
    model: str,
    extra_args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 300.0,
) -> Iterator[str]:
    """Start `llmos-worker serve` on 127.0.0.1 and yield its base URL once /health answers."""
    port = free_port()
    cli = Path(sys.executable).with_name("llmos-worker")
    cmd = [
        str(cli),
        "serve",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
    ]
    base = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | {"HF_HUB_OFFLINE": "1"} | (env or {}),
        )
        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}; see {log_path}")
                try:
                    if httpx.get(base + "/ready", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker not ready in {ready_timeout_s:.0f} s")
                time.sleep(0.5)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _one(
    client: httpx.AsyncClient, base: str, model: str, req: BenchRequest, t0: float
) -> RequestTiming:
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
    timing = RequestTiming(req.request_id, req.prompt_len, time.perf_counter())
    body = {
        "model": model,
        "prompt": req.prompt_token_ids,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks, usage_tokens = 0, None
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
                msg = json.loads(data)
                now = time.perf_counter()
                if msg.get("usage"):
                    usage_tokens = msg["usage"].get("completion_tokens")
                choices = msg.get("choices") or []
                if choices and choices[0].get("text"):
                    timing.chunk_times.append(now)
                    chunks += 1
    except httpx.HTTPError as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    timing.output_len = int(usage_tokens) if usage_tokens is not None else chunks
    return timing


async def _run(base: str, requests: list[BenchRequest]) -> tuple[list[RequestTiming], float]:
    limits = httpx.Limits(max_connections=len(requests) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        model = (await client.get(base + "/v1/models")).json()["data"][0]["id"]
        # warm-up request, not timed
        await _one(
            client,
            base,
            model,
            BenchRequest("warmup", requests[0].prompt_token_ids[:16], 4),
            time.perf_counter(),
        )
        t0 = time.perf_counter()
        timings = await asyncio.gather(*(_one(client, base, model, r, t0) for r in requests))
        return list(timings), time.perf_counter() - t0


def run_online(base: str, requests: list[BenchRequest]) -> tuple[list[RequestTiming], float]:
    """Send the requests at their arrival offsets; (timings, wall duration of the run)."""
    return asyncio.run(_run(base, requests))


def describe_errors(timings: list[RequestTiming]) -> list[str]:
    return sorted({t.error for t in timings if t.error})[:5]

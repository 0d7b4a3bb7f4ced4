"""`python -m bench.slowloris`: the worker under a slow-client flood, measured.

Starts `llmos-worker serve` on the bundled model with its default limits, measures the answer
time of a normal chat request (8 tokens, greedy) on a quiet server, then opens `--connections`
slow clients (5,000 by default), each dripping one byte of a request head every `--drip` seconds
and reconnecting whenever the server cuts it, for `--seconds`. During the attack it sends the same
normal request once a second and samples the worker's own metrics (open and peak connections,
connections cut at a deadline or evicted at the cap). It reports the answer times side by side,
the connections the worker held, and the bytes its log grew per minute. A report, not a test:
nothing is asserted. Writes JSON to `--out` (default docs/bench/slowloris.json) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REQUEST = {
    "model": "smollm2-135m-instruct",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
    "temperature": 0,
}
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: worker\r\nContent-Type: application/json\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def metrics(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("llmos_http_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def normal_request(client: httpx.AsyncClient, url: str) -> float | None:
    """Seconds to a complete answer, None when refused or failed."""
    started = time.perf_counter()
    try:
        reply = await client.post(url + "/v1/chat/completions", json=REQUEST, timeout=60)
    except httpx.HTTPError:
        return None
    return time.perf_counter() - started if reply.status_code == 200 else None


async def slow_client(
    port: int, drip_s: float, stop: asyncio.Event, counts: dict[str, int]
) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["connect_failures"] += 1
            await asyncio.sleep(drip_s)
            continue
        counts["connects"] += 1
        try:
            for byte in HEAD + b"X-Slow: " + b"a" * 10_000:
                if stop.is_set():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(drip_s)
                if reader.at_eof() or writer.is_closing():
                    counts["cut"] += 1
                    break
        except OSError:
            counts["cut"] += 1
        finally:
            writer.close()


async def attack(url: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    counts = {"connects": 0, "cut": 0, "connect_failures": 0}
    clients = [
        asyncio.create_task(slow_client(port, args.drip, stop, counts))
        for _ in range(args.connections)
    ]
    await asyncio.sleep(5)  # let the flood build up
    answers: list[float | None] = []
    samples: list[dict[str, float]] = []
    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            answers.append(await normal_request(client, url))
            samples.append(await asyncio.to_thread(metrics, url))
            await asyncio.sleep(1.0)
    stop.set()
    _, pending = await asyncio.wait(clients, timeout=15)
    for task in pending:
        task.cancel()
    return {"answers": answers, "samples": samples, "counts": counts}


async def quiet(url: str, n: int) -> list[float | None]:
    async with httpx.AsyncClient() as client:
        return [await normal_request(client, url) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--drip", type=float, default=2.0, help="seconds between head bytes")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/slowloris.json"))
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attacker needs the sockets

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = args.out.with_suffix(".worker.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(bin_dir / "llmos-worker"), "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=log,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/ready", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            base = [a for a in asyncio.run(quiet(url, 20)) if a is not None]
            log_before = log_path.stat().st_size
            started = time.monotonic()
            # why: a loop of its own, not asyncio.run: thousands of half-open clients are left to
            # the process exit instead of being awaited one by one
            loop = asyncio.new_event_loop()
            result = loop.run_until_complete(attack(url, port, args))
            elapsed = time.monotonic() - started
            log_bytes = log_path.stat().st_size - log_before
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    answered = [a for a in result["answers"] if a is not None]
    last = result["samples"][-1] if result["samples"] else {}
    summary = {
        "connections_attempted": args.connections,
        "drip_s": args.drip,
        "attack_s": round(elapsed, 1),
        "quiet_median_ms": round(1000 * statistics.median(base), 1) if base else None,
        "attack_median_ms": round(1000 * statistics.median(answered), 1) if answered else None,
        "attack_max_ms": round(1000 * max(answered), 1) if answered else None,
        "normal_requests": len(result["answers"]),
        "normal_requests_answered": len(answered),
        "open_connections_max": max(
            (s.get("llmos_http_open_connections", 0) for s in result["samples"]), default=0
        ),
        "peak_connections": last.get("llmos_http_peak_connections"),
        "cut_at_head_deadline": last.get(
            'llmos_http_connections_closed_total{reason="header_timeout"}'
        ),
        "evicted_idle_at_cap": last.get(
            'llmos_http_connections_closed_total{reason="evicted_idle"}'
        ),
        "refused_at_cap": last.get("llmos_http_connections_refused_total"),
        "slow_connects": result["counts"]["connects"],
        "log_bytes_per_minute": round(log_bytes * 60 / elapsed),
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print("| measure | value |\n|---|---|")
    for key, value in summary.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()

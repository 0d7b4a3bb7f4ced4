"""The gateway's request rate without a model behind it: a fake upstream and a raw load client.

    python -m bench.gateway_load upstream --port P
    python -m bench.gateway_load drive --url http://127.0.0.1:G --connections 32 --seconds 5

`upstream` answers every request at once over keep-alive HTTP/1.1 (a fixed completion for POSTs,
zero load gauges on /metrics, 200 on /ready), so that the gateway in front of it is the bottleneck.
`drive` keeps `connections` keep-alive connections busy with one small non-streaming completion
each, back to back, for `seconds`, and prints a JSON line: requests completed, errors, requests/s
and its own CPU seconds. Both are plain asyncio streams (no HTTP library) so that they cost far
less CPU per request than the gateway does; each runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

COMPLETION = json.dumps(
    {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "text": " ok", "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
    }
).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode()
METRICS = (
    b"llmos_num_requests_running 0\nllmos_num_requests_waiting 0\nllmos_kv_cache_usage_perc 0\n"
)
REQUEST_BODY = json.dumps({"model": "fake", "prompt": "Hello there", "max_tokens": 1}).encode()


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, path, lower-cased headers) of an HTTP/1.1 request or response head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2:
        raise ValueError(f"malformed start line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


def response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def answer(method: str, path: str) -> bytes:
    """The fake upstream's whole response to one request."""
    path = path.split("?", 1)[0]
    if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
        return response(200, COMPLETION)
    if path == "/v1/models":
        return response(200, MODELS)
    if path == "/metrics":
        return response(200, METRICS, "text/plain; version=0.0.4")
    if path in ("/ready", "/health"):
        return response(200, b'{"status":"ready"}')
    return response(404, b'{"error":{"message":"not found","type":"not_found"}}')


async def _serve_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            method, path, headers = parse_head(head[:-4])
            length = int(headers.get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)
            writer.write(answer(method, path))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_serve_conn, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    _, status, headers = parse_head(head[:-4])
    length = headers.get("content-length")
    if length is not None:
        await reader.readexactly(int(length))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return int(status)


async def _client(host: str, port: int, path: str, until: float, counts: dict[str, int]) -> None:
    request = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(REQUEST_BODY)}\r\n\r\n"
    ).encode() + REQUEST_BODY
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < until:
            writer.write(request)
            status = await _read_response(reader)
            counts["ok" if status == 200 else "errors"] += 1
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        counts["errors"] += 1
    finally:
        writer.close()


async def drive(url: str, connections: int, seconds: float) -> dict[str, float]:
    """Closed-loop load on `url` (POST /v1/completions): requests/s over `seconds`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    counts = {"ok": 0, "errors": 0}
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    until = t0 + seconds
    await asyncio.gather(
        *(_client(host, port, "/v1/completions", until, counts) for _ in range(connections))
    )
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "requests": counts["ok"],
        "errors": counts["errors"],
        "wall_s": round(wall, 3),
        "requests_per_s": round(counts["ok"] / wall, 1) if wall > 0 else 0.0,
        "client_cpu_s": round(cpu, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gateway_load", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    dr = sub.add_parser("drive")
    dr.add_argument("--url", required=True)
    dr.add_argument("--connections", type=int, default=32)
    dr.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    if args.cmd == "upstream":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.port))
        return 0
    if args.connections < 1 or args.seconds <= 0:
        p.error("--connections must be >= 1 and --seconds > 0")
    print(json.dumps(asyncio.run(drive(args.url, args.connections, args.seconds))))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

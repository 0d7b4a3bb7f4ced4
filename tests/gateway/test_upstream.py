"""The upstream clients: aiohttp (the gateway's) and httpx behave the same at the proxy's seams.

Both are driven against real servers on loopback: a fake upstream for the answers and faults a
worker does not make on demand, a socket nobody listens on, and a raw TCP server (`raw_upstream`)
that cuts a response in the middle of its body.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from llmos_gateway.upstream import (
    AiohttpUpstream,
    ConnectFailed,
    HttpxUpstream,
    ReadFailed,
    ReadTimedOut,
    Upstream,
)
from tests.gateway.conftest import fake, raw_upstream

Make = Callable[[float], Upstream]


def _aiohttp(read_timeout_s: float) -> Upstream:
    return AiohttpUpstream(connect_timeout_s=2.0, read_timeout_s=read_timeout_s)


def _httpx(read_timeout_s: float) -> Upstream:
    return HttpxUpstream(httpx.AsyncClient(timeout=httpx.Timeout(2.0, read=read_timeout_s)))


CLIENTS = pytest.mark.parametrize("make", [_aiohttp, _httpx], ids=["aiohttp", "httpx"])


async def _body(response: object) -> bytes:
    return b"".join([c async for c in response.aiter_raw()])  # type: ignore[attr-defined]


async def _echo(request: Request) -> Response:
    """The request as the upstream saw it, and a gzip body the proxy must not decode."""
    seen = "\n".join(f"{k}: {v}" for k, v in request.headers.items())
    body = await request.body()
    return Response(
        gzip.compress(seen.encode() + b"\n\n" + body),
        headers={"content-encoding": "gzip", "x-seen": "1", "x-multi": "a"},
    )


@CLIENTS
async def test_headers_and_body_pass_as_they_are(make: Make) -> None:
    upstream = make(10.0)
    with fake(_echo) as up:
        headers = {"content-type": "application/json", "authorization": "Bearer k", "x-a": "1"}
        r = await upstream.open("POST", up.url + "/v1/completions", headers, b'{"prompt":"hi"}')
        raw = await _body(r)
        await r.aclose()
    await upstream.aclose()
    assert r.status_code == 200
    assert r.header("content-encoding") == "gzip" and r.header("X-SEEN") == "1"
    assert r.header("absent") is None
    assert ("x-multi", "a") in [(k.lower(), v) for k, v in r.header_items()]
    seen, _, body = gzip.decompress(raw).partition(b"\n\n")  # the bytes, not decoded
    assert body == b'{"prompt":"hi"}'
    lines = seen.decode().splitlines()
    assert "authorization: Bearer k" in lines and "x-a: 1" in lines
    assert "content-type: application/json" in lines
    if make is _aiohttp:  # nothing of its own added (httpx sends its user-agent)
        assert not any(line.startswith(("user-agent:", "accept")) for line in lines)


@CLIENTS
async def test_streamed_chunks_arrive_before_the_body_ends(make: Make) -> None:
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def handler(_: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(release.wait(), loop))
            yield b"data: two\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    upstream = make(10.0)
    with fake(handler) as up:
        r = await upstream.open("POST", up.url + "/v1/completions", {}, b"{}")
        stream = r.aiter_raw()
        assert await anext(stream) == b"data: one\n\n"  # while the upstream still holds two
        release.set()
        assert b"".join([c async for c in stream]) == b"data: two\n\n"
        await r.aclose()
    await upstream.aclose()


@CLIENTS
async def test_a_refused_connection_is_connect_failed(make: Make) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        upstream = make(5.0)
        with pytest.raises(ConnectFailed):
            await upstream.open("POST", f"http://127.0.0.1:{port}/v1/completions", {}, b"{}")
    await upstream.aclose()


@CLIENTS
async def test_a_slow_answer_is_read_timed_out(make: Make) -> None:
    async def slow(_: Request) -> Response:
        await asyncio.sleep(3)
        return Response(b"late")

    upstream = make(0.3)
    with fake(slow) as up, pytest.raises(ReadTimedOut):
        await upstream.open("POST", up.url + "/v1/completions", {}, b"{}")
    await upstream.aclose()


@CLIENTS
async def test_a_body_cut_short_is_read_failed(make: Make) -> None:
    cut = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{"
    upstream = make(5.0)
    with raw_upstream(cut) as url:
        r = await upstream.open("POST", url + "/v1/completions", {"content-length": "2"}, b"{}")
        with pytest.raises(ReadFailed):
            await _body(r)
        await r.aclose()
    await upstream.aclose()


async def test_aiohttp_reuses_its_keep_alive_connection() -> None:
    peers: list[tuple[str, int]] = []

    async def who(request: Request) -> Response:
        assert request.client is not None
        peers.append((request.client.host, request.client.port))
        return Response(b"ok")

    upstream = AiohttpUpstream()
    with fake(who) as up:
        for _ in range(3):
            r = await upstream.open("POST", up.url + "/v1/completions", {}, b"{}")
            assert await _body(r) == b"ok"
            await r.aclose()
    await upstream.aclose()
    assert len(set(peers)) == 1  # one connection for the three requests

"""The gateway in front of real worker processes: passthrough, streaming, routing, errors.

Two tiny-model workers (shared by the session) sit behind a gateway that runs the real app and
protocol on a loopback port. Answers through the gateway must equal the same request sent to
the worker directly (greedy sampling, same weights in both workers); which replica served a
request is read from the gateway's `llmos_gateway_upstream_requests` counter. Upstream faults
the real worker cannot produce on demand (a 503, garbage, a stall) come from small in-process
fake upstreams.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tests.gateway.conftest import GatewayServer, WorkerProcess, fake, raw_upstream

LONG = "You are a careful assistant who answers questions about the weather. " * 12


def served(gw: GatewayServer) -> dict[str, float]:
    """Requests sent to each replica so far (retries included)."""
    out: dict[str, float] = {}
    for family in gw.core.metrics.upstream_requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[sample.labels["replica"]] = sample.value
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def sse_events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def stream_text(events: list[str], chat: bool) -> str:
    out = []
    for e in events:
        if e == "[DONE]":
            continue
        choice = json.loads(e)["choices"]
        if not choice:
            continue
        if chat:
            out.append(choice[0]["delta"].get("content") or "")
        else:
            out.append(choice[0]["text"])
    return "".join(out)


@pytest.fixture(scope="module")
def model(workers: list[WorkerProcess]) -> str:
    name: str = httpx.get(workers[0].url + "/v1/models").json()["data"][0]["id"]
    return name


@pytest.fixture(scope="module")
def gw(workers: list[WorkerProcess]) -> Iterator[GatewayServer]:
    argv = [a for w in workers for a in ("--replica", w.url)]
    with GatewayServer([*argv, "--strategy", "prefix", "--scrape-interval", "0.2"]) as server:
        yield server


@pytest.fixture(scope="module")
def rr(workers: list[WorkerProcess]) -> Iterator[GatewayServer]:
    argv = [a for w in workers for a in ("--replica", w.url)]
    with GatewayServer([*argv, "--strategy", "round-robin"]) as server:
        yield server


def test_models_passthrough(gw: GatewayServer, workers: list[WorkerProcess]) -> None:
    via = httpx.get(gw.url + "/v1/models")
    direct = httpx.get(workers[0].url + "/v1/models")
    assert via.status_code == 200
    assert [m["id"] for m in via.json()["data"]] == [m["id"] for m in direct.json()["data"]]
    assert via.headers["content-type"].startswith("application/json")
    assert len(via.headers.get_list("date")) == 1


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_non_streamed_equals_direct(
    gw: GatewayServer, workers: list[WorkerProcess], model: str, route: str
) -> None:
    chat = route.endswith("chat/completions")
    body: dict[str, object] = {"model": model, "max_tokens": 12, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": "Tell me about the sea."}]
    else:
        body["prompt"] = "The sea is"
    via = httpx.post(gw.url + route, json=body, timeout=60)
    assert via.status_code == 200, via.text
    for w in workers:
        direct = httpx.post(w.url + route, json=body, timeout=60).json()
        got = via.json()["choices"][0]
        want = direct["choices"][0]
        if chat:
            assert got["message"]["content"] == want["message"]["content"]
        else:
            assert got["text"] == want["text"]
        assert via.json()["usage"] == direct["usage"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_equals_direct(
    gw: GatewayServer, workers: list[WorkerProcess], model: str, route: str
) -> None:
    chat = route.endswith("chat/completions")
    body: dict[str, object] = {"model": model, "max_tokens": 16, "temperature": 0, "stream": True}
    if chat:
        body["messages"] = [{"role": "user", "content": "Count to five."}]
    else:
        body["prompt"] = "One, two,"
    for w in workers:  # why: both prefix caches warm, so the compared runs are both cached
        httpx.post(w.url + route, json=body, timeout=60)
    before = served(gw)
    with httpx.stream("POST", gw.url + route, json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        via = sse_events(r.read().decode())
    (replica,) = delta(before, served(gw))
    direct = sse_events(httpx.post(replica + route, json=body, timeout=60).text)
    assert via[-1] == "[DONE]"
    assert stream_text(via, chat) == stream_text(direct, chat)


def test_prefix_stickiness(gw: GatewayServer, model: str) -> None:
    """Requests sharing a long leading prefix land on one replica; other prefixes spread."""
    homes: set[str] = set()
    for session in range(6):
        before = served(gw)
        for q in range(4):
            r = httpx.post(
                gw.url + "/v1/completions",
                json={
                    "model": model,
                    "prompt": f"Session {session}. {LONG} Question {q}?",
                    "max_tokens": 2,
                },
                timeout=60,
            )
            assert r.status_code == 200, r.text
        d = delta(before, served(gw))
        assert list(d.values()) == [4.0], d  # all four of the session on one replica
        homes.update(d)
    assert len(homes) == 2  # six sessions: both replicas are somebody's home


def test_round_robin_spreads_a_shared_prefix(rr: GatewayServer, model: str) -> None:
    before = served(rr)
    for q in range(4):
        body = {"model": model, "prompt": f"{LONG} Question {q}?", "max_tokens": 2}
        assert httpx.post(rr.url + "/v1/completions", json=body, timeout=60).status_code == 200
    assert sorted(delta(before, served(rr)).values()) == [2.0, 2.0]


def test_overflow_under_skew(gw: GatewayServer, model: str) -> None:
    """Open streams all keyed to one home: past the load bound, the next ones overflow."""
    body = {
        "model": model,
        "prompt": f"Skewed. {LONG}",
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    before = served(gw)
    readers = []  # why: a dropped iterator closes its stream; these keep all six open
    with ExitStack() as stack, httpx.Client(timeout=60) as client:
        for _ in range(6):
            r = stack.enter_context(client.stream("POST", gw.url + "/v1/completions", json=body))
            assert r.status_code == 200
            readers.append(r.iter_raw())
            next(readers[-1])  # streaming: held open on its replica
        per_replica = delta(before, served(gw))
    # one home, bound ceil((n+1) * 1.25 / 2): at most 4 of the 6 on it, the rest overflow
    assert sorted(per_replica.values()) in ([2.0, 4.0], [3.0, 3.0])
    outcomes = {
        s.labels["outcome"]: s.value
        for f in gw.core.metrics.decisions.collect()
        for s in f.samples
        if s.name.endswith("_total")
    }
    # the first spill is an overflow; later ones go where that prefix is now cached
    assert outcomes.get("overflow", 0) >= 1
    assert outcomes.get("overflow", 0) + outcomes.get("cached", 0) >= 2


def test_upstream_4xx_passes_through(gw: GatewayServer, model: str) -> None:
    r = httpx.post(
        gw.url + "/v1/completions",
        json={"model": model, "prompt": "x", "max_tokens": -3},
        timeout=30,
    )
    assert r.status_code == 400
    assert set(r.json()["error"]) >= {"message", "type", "code"}
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    )
    assert r.status_code == 404
    assert "error" in r.json()


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"{not json", {}, 400),
        (b"[1, 2]", {}, 400),
        (b"\xff\xfe\x00", {}, 400),
        (b"{" + b" " * (5 << 20) + b"}", {}, 413),
    ],
)
def test_malformed_client_input_is_4xx(
    gw: GatewayServer, content: bytes, headers: dict[str, str], status: int
) -> None:
    before = served(gw)
    r = httpx.post(gw.url + "/v1/completions", content=content, headers=headers, timeout=30)
    assert r.status_code == status
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert delta(before, served(gw)) == {}  # never forwarded


def test_unknown_route_and_method(gw: GatewayServer) -> None:
    assert httpx.get(gw.url + "/v1/nothing").status_code == 404
    r = httpx.get(gw.url + "/v1/completions")
    assert r.status_code == 405
    assert "error" in r.json()


def test_raw_garbage_does_not_hurt_the_gateway(gw: GatewayServer, model: str) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"\x00\x01 NOT HTTP AT ALL\r\n\r\n")
        s.recv(4096)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n")
        s.recv(4096)
    r = httpx.post(
        gw.url + "/v1/completions", json={"model": model, "prompt": "ok", "max_tokens": 1}
    )
    assert r.status_code == 200


# --------------------------------------------------------------------------- fake upstreams
def test_sse_is_relayed_without_buffering() -> None:
    """The upstream sends one event, then waits until the client has seen it via the gateway:
    a gateway that buffered the stream would never deliver it (and the test would time out)."""
    seen = threading.Event()

    async def events(_: Request) -> Response:
        async def gen() -> AsyncIterator[bytes]:
            yield b'data: {"n": 1}\n\n'
            while not seen.is_set():
                await asyncio.sleep(0.01)
            yield b'data: {"n": 2}\n\ndata: [DONE]\n\n'

        return StreamingResponse(gen(), media_type="text/event-stream")

    with (
        fake(events) as up,
        GatewayServer(["--replica", up.url]) as gw,
        httpx.stream("POST", gw.url + "/v1/completions", json={}, timeout=20) as r,
    ):
        lines = r.iter_lines()
        assert next(lines) == 'data: {"n": 1}'
        seen.set()
        assert [line for line in lines if line] == ['data: {"n": 2}', "data: [DONE]"]


def test_upstream_503_everywhere_is_openai_shaped() -> None:
    calls: list[int] = []

    async def busy(_: Request) -> Response:
        calls.append(1)
        body = {"error": {"message": "busy", "type": "x", "param": None, "code": "busy"}}
        return Response(json.dumps(body), status_code=503, media_type="application/json")

    with (
        fake(busy) as a,
        fake(busy) as b,
        GatewayServer(["--replica", a.url, "--replica", b.url]) as gw,
    ):
        r = httpx.post(gw.url + "/v1/completions", json={}, timeout=20)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "busy"
    assert len(calls) == 2  # tried each replica once


def test_unreachable_replicas_give_502() -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    argv = [a for p in ports for a in ("--replica", f"http://127.0.0.1:{p}")]
    with GatewayServer(argv) as gw:
        r = httpx.post(gw.url + "/v1/completions", json={"prompt": "x"}, timeout=20)
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "upstream_error"
    assert r.json()["error"]["code"] == "upstream_unavailable"


def test_upstream_stall_gives_504() -> None:
    release = threading.Event()

    async def stall(_: Request) -> Response:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return Response("{}")

    with fake(stall) as up:
        with GatewayServer(["--replica", up.url, "--upstream-read-timeout", "0.3"]) as gw:
            r = httpx.post(gw.url + "/v1/completions", json={}, timeout=20)
            # a slow replica is not a broken one: it stays in rotation, and nothing was retried
            assert not any(rep.ejected(time.monotonic()) for rep in gw.core.pool.all())
            registry = gw.core.metrics.registry
            assert registry.get_sample_value("llmos_gateway_upstream_timeouts_total") == 1
            retried = registry.get_sample_value(
                "llmos_gateway_retries_total", {"reason": "read_timeout"}
            )
            assert retried is None
        release.set()
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"


def test_garbage_from_upstream_gives_502() -> None:
    """A replica that answers bytes that are not HTTP costs the client a clean 502."""
    with (
        raw_upstream(b"\x00garbage\xff\r\n\r\n") as url,
        GatewayServer(["--replica", url]) as gw,
    ):
        r = httpx.post(gw.url + "/v1/completions", json={}, timeout=20)
        assert r.status_code == 502
        assert "error" in r.json()
        assert httpx.get(gw.url + "/health").status_code == 200


def test_a_non_streamed_body_cut_short_gives_502() -> None:
    """A replica that declares a whole JSON body and closes halfway: nothing was sent to the
    client yet (small answers are read whole), so it gets an OpenAI-shaped 502, not a torso."""
    cut = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b'content-length: 400\r\n\r\n{"id": "cmpl-1", "choices": ['
    )
    with raw_upstream(cut) as url, GatewayServer(["--replica", url]) as gw:
        r = httpx.post(gw.url + "/v1/completions", json={"prompt": "x"}, timeout=20)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_failed"
        cuts = gw.core.metrics.registry.get_sample_value("llmos_gateway_upstream_cut_total")
        assert cuts == 1

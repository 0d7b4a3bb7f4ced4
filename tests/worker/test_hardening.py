"""The worker as an attacker meets it: slow clients, connection floods, log floods, odd Unicode,
rate-limit bypass, priority grabs; and its memory by default.

Slow-client tests speak raw TCP to a real `llmos-worker serve` process (tiny model) started with
short deadlines, so each deadline is seconds, not the production defaults. Upper bounds on how
long the server takes to cut a connection are generous (a loaded machine), and no test measures
speed.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos_worker.engine.params import SamplingParams
from llmos_worker.server.admission import Caller, admit
from llmos_worker.server.auth import ApiKeyAuth, ApiKeyFileError, hash_key
from llmos_worker.server.ratelimit import RateLimiter, RateLimits
from tests.worker.server_harness import (
    InProcessServer,
    WrappedEngine,
    engine_factory,
    free_port,
    start_worker_process,
    wait_ready,
)

HEAD = (
    "POST /v1/completions HTTP/1.1\r\nHost: worker\r\nContent-Type: application/json\r\n"
    "Content-Length: {length}\r\n\r\n"
)
BODY = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 2, "temperature": 0})


class Worker:
    """A running `llmos-worker serve` process and where it logs."""

    def __init__(self, url: str, port: int, log: Path, metrics_url: str) -> None:
        self.url, self.port, self.log, self.metrics_url = url, port, log, metrics_url

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        text = httpx.get(self.metrics_url, headers=headers, timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#")
        )

    def complete(self, **headers: str) -> httpx.Response:
        return httpx.post(
            self.url + "/v1/completions", content=BODY, headers=headers or None, timeout=60
        )


@contextlib.contextmanager
def worker(
    tmp_path: Path, model: Path, *flags: str, metrics_port: int | None = None
) -> Iterator[Worker]:
    port = free_port()
    log = tmp_path / f"worker-{port}.log"
    args = [
        "--model",
        str(model),
        "--served-model-name",
        "tiny",
        "--kv-cache-memory-bytes",
        str(8 * 1024 * 1024),
        "--max-num-seqs",
        "8",
        *flags,
    ]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    proc = start_worker_process(args, port=port, log_path=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        metrics = f"http://127.0.0.1:{metrics_port or port}/metrics"
        yield Worker(url, port, log, metrics)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def fast_deadlines(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """Deadlines of about a second, a cap of 32 connections."""
    with worker(
        tmp_path_factory.mktemp("fast"),
        tiny_model_dir,
        "--header-read-timeout",
        "1",
        "--body-read-timeout",
        "1",
        "--keep-alive-timeout",
        "1",
        "--max-connections",
        "32",
    ) as w:
        yield w


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Read until the server closes the connection or `seconds` pass: (closed, bytes read)."""
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def test_a_connection_that_sends_nothing_is_closed(fast_deadlines: Worker) -> None:
    with connect(fast_deadlines.port) as sock:
        closed, got = closed_within(sock, 15)
    assert closed, "an idle connection must not be held open forever"
    assert got == b"", "nothing was asked, nothing is answered"


def test_a_head_dripped_byte_by_byte_is_cut_at_the_deadline(fast_deadlines: Worker) -> None:
    """Slowloris: every byte re-arms an idle timer, but not the head deadline."""
    head = HEAD.format(length=len(BODY)).encode()
    with connect(fast_deadlines.port) as sock:
        started = time.monotonic()
        closed = False
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            closed, got = closed_within(sock, 0.25)
            if closed:
                break
            assert time.monotonic() - started < 20, "still open after 20 s of dripping"
    assert closed
    assert b"408" in got or got == b""


def test_a_body_shorter_than_its_content_length_is_cut(fast_deadlines: Worker) -> None:
    with connect(fast_deadlines.port) as sock:
        sock.sendall(HEAD.format(length=10_000).encode() + b'{"model": ')
        closed, got = closed_within(sock, 15)
    assert closed, "a body that never completes must not hold the connection"
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b'"error"' in got
    assert fast_deadlines.complete().status_code == 200, "the server goes on serving"
    assert fast_deadlines.metric('llmos_http_connections_closed_total{reason="body_timeout"}') >= 1


def test_at_the_cap_idle_connections_make_room_for_real_requests(fast_deadlines: Worker) -> None:
    idle = [connect(fast_deadlines.port) for _ in range(60)]  # the cap is 32
    try:
        time.sleep(0.3)
        for _ in range(3):
            assert fast_deadlines.complete().status_code == 200
        assert fast_deadlines.metric("llmos_http_peak_connections") <= 32
        assert fast_deadlines.metric('llmos_http_connections_closed_total{reason="evicted_idle"}')
    finally:
        for sock in idle:
            sock.close()


def test_clients_that_vanish_mid_body_and_garbage_cost_a_few_log_lines(
    fast_deadlines: Worker,
) -> None:
    before = fast_deadlines.log.read_text()
    for _ in range(60):
        with connect(fast_deadlines.port) as sock:
            sock.sendall(HEAD.format(length=len(BODY)).encode() + BODY[:5].encode())
            time.sleep(0.01)
            # why: SO_LINGER 0 resets the connection, as a client killed mid-send does
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    for _ in range(100):
        with connect(fast_deadlines.port) as sock:
            sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            closed_within(sock, 5)
    assert fast_deadlines.complete().status_code == 200
    time.sleep(0.5)
    added = fast_deadlines.log.read_text()[len(before) :]
    assert "Traceback" not in added, added[-3000:]
    assert " ERROR " not in added, added[-3000:]
    assert len(added.splitlines()) <= 15, added[-3000:]


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps({"keys": [{"tenant": "team-a", "sha256": hash_key("key-a")}]}))
    return path


@pytest.fixture(scope="module")
def tight_caps(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, keys_file: Path
) -> Iterator[Worker]:
    """Long deadlines, 16 connections, 4 in-flight requests, API keys, a metrics port."""
    with worker(
        tmp_path_factory.mktemp("caps"),
        tiny_model_dir,
        "--header-read-timeout",
        "60",
        "--body-read-timeout",
        "60",
        "--max-connections",
        "16",
        "--max-inflight-requests",
        "4",
        "--api-keys-file",
        str(keys_file),
        metrics_port=free_port(),
    ) as w:
        yield w


KEY = {"Authorization": "Bearer key-a"}


def wait_metric(w: Worker, name: str, done: Callable[[float], bool]) -> None:
    """Poll the metrics port until `name` satisfies `done` (a page refused at the connection
    cap is not an answer yet): the server has seen what the test did, however slow it is."""
    deadline = time.monotonic() + 30
    while True:
        page = httpx.get(w.metrics_url, timeout=10)
        if page.status_code == 200:
            value = sum(
                float(line.rsplit(" ", 1)[1])
                for line in page.text.splitlines()
                if line.startswith(name) and not line.startswith("#")
            )
            if done(value):
                return
        assert time.monotonic() < deadline, f"{name} never reached the wanted value"
        time.sleep(0.02)


def wait_inside_a_request(socks: list[socket.socket], refused: int) -> None:
    """Block until `refused` of `socks` were answered 503 too_many_requests_in_flight: each such
    answer means the in-flight cap was full, so every head was read and every connection is
    inside a request (the rest wait for their bodies), not idle and open to eviction."""
    answered: set[int] = set()
    deadline = time.monotonic() + 30
    while len(answered) < refused:
        assert time.monotonic() < deadline, f"only {len(answered)} of {refused} refused"
        waiting = [s for i, s in enumerate(socks) if i not in answered]
        readable, _, _ = select.select(waiting, [], [], 0.1)
        for sock in readable:
            got = sock.recv(65536, socket.MSG_PEEK)
            assert got.startswith(b"HTTP/1.1 503"), got[:200]
            if b"too_many_requests_in_flight" in got:
                answered.add(socks.index(sock))


def open_request(port: int) -> socket.socket:
    """A connection inside a request: head sent, body still to come."""
    sock = connect(port)
    head = HEAD.format(length=len(BODY)).replace(
        "Host: worker\r\n", "Host: worker\r\nAuthorization: Bearer key-a\r\n"
    )
    sock.sendall(head.encode() + BODY[:3].encode())
    return sock


def test_in_flight_requests_past_the_cap_get_503_with_retry_after(tight_caps: Worker) -> None:
    pending = [open_request(tight_caps.port) for _ in range(4)]
    try:
        # all four heads read (they wait for their bodies): the cap is full
        wait_metric(tight_caps, "llmos_http_requests_in_flight", lambda n: n == 4)
        refused = tight_caps.complete(**KEY)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_requests_in_flight"
        for sock in pending:
            sock.sendall(BODY[3:].encode())
        for sock in pending:
            sock.settimeout(60)
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        for sock in pending:
            sock.close()
    # why: a client may read a response before the server counted its request out
    wait_metric(tight_caps, "llmos_http_requests_in_flight", lambda n: n == 0)
    assert tight_caps.complete(**KEY).status_code == 200


def test_when_every_connection_is_busy_a_new_one_gets_503(tight_caps: Worker) -> None:
    busy = [open_request(tight_caps.port) for _ in range(16)]
    try:
        # four in flight wait for their bodies, twelve were refused past the in-flight cap of 4
        wait_inside_a_request(busy, refused=12)
        with connect(tight_caps.port) as sock:
            closed, got = closed_within(sock, 15)
        assert closed
        assert got.startswith(b"HTTP/1.1 503"), got[:200]
        assert b"retry-after: 1" in got.lower()
        assert b"too_many_connections" in got
    finally:
        for sock in busy:
            sock.close()
    # the server has seen the sixteen go (only the metrics page's own connection is open)
    wait_metric(tight_caps, "llmos_http_open_connections", lambda n: n <= 1)
    assert tight_caps.complete(**KEY).status_code == 200
    assert tight_caps.metric("llmos_http_connections_refused_total") >= 1


def test_models_need_the_key_and_metrics_live_on_their_own_port(tight_caps: Worker) -> None:
    assert httpx.get(tight_caps.url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(tight_caps.url + "/v1/models", headers=KEY, timeout=10).status_code == 200
    assert httpx.get(tight_caps.url + "/metrics", headers=KEY, timeout=10).status_code == 404
    page = httpx.get(tight_caps.metrics_url, timeout=10)  # no key: the port is the boundary
    assert page.status_code == 200 and "llmos_http_open_connections" in page.text
    served_there = httpx.get(tight_caps.metrics_url.replace("/metrics", "/v1/models"), timeout=10)
    assert served_there.status_code == 404


def test_metrics_on_the_api_port_need_the_key_when_keys_are_configured(
    tiny_model_dir: Path,
) -> None:
    auth = ApiKeyAuth({hash_key("key-a"): "team-a"})
    with InProcessServer(engine_factory(str(tiny_model_dir)), auth=auth) as srv:
        assert httpx.get(srv.url + "/metrics", timeout=10).status_code == 401
        assert httpx.get(srv.url + "/metrics", headers=KEY, timeout=10).status_code == 200


# ---------------------------------------------------------------------- in-process behaviour
@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Path) -> Iterator[InProcessServer]:
    with InProcessServer(engine_factory(str(tiny_model_dir)), served_model_name="tiny") as srv:
        yield srv


@pytest.mark.parametrize(
    "body",
    [
        '{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 1}',
        '{"model": "tiny", "prompt": ["\\udfff", "ok \\ud83d\\ude00"], "max_tokens": 1}',
        '{"model": "tiny", "messages": [{"role": "user", "content": "x\\udc00"}], "max_tokens": 1}',
        '{"model": "tiny", "messages": [{"role": "user", "content": '
        '[{"type": "text", "text": "\\ud800"}]}], "max_tokens": 1}',
    ],
)
def test_lone_surrogates_are_replaced_not_a_500(tiny_server: InProcessServer, body: str) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = httpx.post(
        tiny_server.url + path,
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text


def test_random_bearer_tokens_share_the_anonymous_bucket_of_their_address(
    tiny_model_dir: Path,
) -> None:
    limits = RateLimits.from_document({"version": 1, "perApiKey": {"requestsPerMinute": 2}})
    with InProcessServer(
        engine_factory(str(tiny_model_dir)),
        served_model_name="tiny",
        limiter=RateLimiter(limits),
    ) as srv:
        codes = []
        for i in range(3):
            reply = httpx.post(
                srv.url + "/v1/completions",
                content=BODY,
                headers={"Authorization": f"Bearer random-{i}"},
                timeout=60,
            )
            codes.append(reply.status_code)
        assert codes == [200, 200, 429]
        assert reply.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(reply.headers["retry-after"]) >= 1


class PriorityProbe(WrappedEngine):
    """The real engine, recording the priority each request reached it with."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.priorities: list[int] = []

    def add_request(self, *args: Any, **kwargs: Any) -> Any:
        self.priorities.append(kwargs.get("priority", 0))
        return self._engine.add_request(*args, **kwargs)


def test_callers_without_a_grant_cannot_jump_the_queue(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"tenant": "plain", "sha256": hash_key("plain")},
                    {"tenant": "vip", "sha256": hash_key("vip"), "priority": -5},
                ]
            }
        )
    )
    build = engine_factory(str(tiny_model_dir))
    probe: list[PriorityProbe] = []

    def loader() -> Any:
        probe.append(PriorityProbe(build()))
        return probe[0]

    with InProcessServer(loader, served_model_name="tiny", auth=ApiKeyAuth.from_file(keys)) as srv:
        for key, asked in (("plain", -100), ("plain", 3), ("vip", -100), ("vip", -2)):
            reply = httpx.post(
                srv.url + "/v1/completions",
                json={**json.loads(BODY), "priority": asked},
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            assert reply.status_code == 200, reply.text
    assert probe[0].priorities == [0, 3, -5, -2]


def test_anonymous_callers_get_the_default_priority_floor() -> None:
    params = SamplingParams(max_tokens=4)
    anonymous = Caller.anonymous("10.0.0.9")
    assert admit(None, anonymous, [3], params, max_model_len=64, priority=-7).priority == 0
    limiter = RateLimiter(RateLimits(priority=2))
    assert admit(limiter, anonymous, [3], params, max_model_len=64, priority=-7).priority == 2
    granted = Caller.authenticated("vip", -5)
    assert admit(limiter, granted, [3], params, max_model_len=64, priority=-7).priority == 2


def test_a_priority_grant_must_be_an_integer(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"tenant": "t", "sha256": "0" * 64, "priority": "hi"}]}))
    with pytest.raises(ApiKeyFileError, match=r"keys\[0\]\.priority"):
        ApiKeyAuth.from_file(keys)


# ---------------------------------------------------------------------- memory by default
def test_the_kv_cache_costs_resident_memory_only_as_it_is_used(tiny_model_dir: Path) -> None:
    from llmos_worker.model import load_model
    from llmos_worker.model.runner import ModelRunner

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    loaded = load_model(str(tiny_model_dir))
    per_block = ModelRunner.bytes_per_block(loaded.config, 16, loaded.dtype)
    blocks = (1 << 30) // per_block  # a 1 GiB cache
    before = rss()
    runner = ModelRunner(loaded, block_size=16, num_blocks=blocks)
    assert rss() - before < 256 << 20, "an unused cache must not be resident"
    runner.kv_cache[:, :, :4].fill_(1.0)  # a few blocks in use
    assert rss() - before < 256 << 20
    assert float(runner.kv_cache[0, 0, 4].abs().sum()) == 0.0, "untouched blocks read as zeros"


def test_the_default_cache_is_sized_from_seats_and_length_and_says_why(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from llmos_worker.engine.config import EngineConfig
    from llmos_worker.engine.engine import LLMEngine

    with caplog.at_level("INFO", logger="llmos_worker.engine.engine"):
        engine = LLMEngine.from_source(
            str(tiny_model_dir), EngineConfig(max_num_seqs=3, max_model_len=100)
        )
    assert engine.num_blocks == 3 * 7 + 1  # ceil(100 / 16) blocks per seat, plus one spare
    message = next(r.getMessage() for r in caplog.records if "KV cache" in r.getMessage())
    assert "22 blocks" in message and "max_num_seqs 3 x max_model_len 100" in message
    assert "kv_cache_memory_fraction 0.2" in message


def test_the_log_filter_passes_a_burst_per_template_then_counts_what_it_dropped() -> None:
    import logging

    from llmos_worker.server.logfilter import RateLimitFilter

    now = [0.0]
    flt = RateLimitFilter(burst=3, window_s=60.0, clock=lambda: now[0])

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, msg, args, None)

    passed = [flt.filter(record("Invalid HTTP request from %s", i)) for i in range(100)]
    assert passed.count(True) == 3, "the same template, whatever its arguments"
    assert flt.filter(record("another message"))  # other templates are not limited by it
    now[0] += 61.0
    first = record("Invalid HTTP request from %s", "x")
    assert flt.filter(first)
    assert "97 similar messages suppressed" in first.getMessage()


def test_anonymous_ipv6_clients_share_a_bucket_per_64() -> None:
    # why: one subscriber holds a /64 and may pick a fresh address per request
    a = Caller.anonymous("2001:db8:1:2:aaaa::1")
    b = Caller.anonymous("2001:db8:1:2:ffff:ffff:ffff:ffff")
    other = Caller.anonymous("2001:db8:1:3::1")
    assert a.rate_key == b.rate_key == "ip:2001:db8:1:2::/64"
    assert other.rate_key != a.rate_key
    assert Caller.anonymous("::ffff:10.0.0.9").rate_key == Caller.anonymous("10.0.0.9").rate_key
    assert Caller.anonymous("10.0.0.9").rate_key != Caller.anonymous("10.0.0.10").rate_key
    assert Caller.anonymous("testclient").rate_key == "ip:testclient"

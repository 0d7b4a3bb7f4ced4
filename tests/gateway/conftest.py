"""Gateway test fixtures: real tiny worker processes on loopback and an in-process gateway.

Two `llmos-worker serve` processes on the tiny random model are shared by the whole session (they
start in a few seconds); `GatewayServer` runs the real gateway app under uvicorn with the
gateway's guarded protocol in a thread, so tests talk to it over TCP and can read its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from llmos_gateway.app import Gateway
from llmos_gateway.cli import build, parser
from llmos_gateway.transport import TransportLimits, guarded_protocol
from tests.worker.conftest import smollm2_gguf, smollm2_tokenizer_dir, tiny_model_dir
from tests.worker.server_harness import free_port, start_worker_process, wait_ready

__all__ = ["smollm2_gguf", "smollm2_tokenizer_dir", "tiny_model_dir"]

WORKER_ARGS = ["--kv-cache-memory-bytes", str(16 * 1024 * 1024), "--max-num-seqs", "64"]


class WorkerProcess:
    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_worker_process(
            ["--model", str(model_dir), *WORKER_ARGS],
            port=self.port,
            log_path=log_dir / f"worker-{self.port}.log",
        )

    def wait(self) -> WorkerProcess:
        wait_ready(self.url, self.proc)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_workers(n: int, model_dir: Path, log_dir: Path) -> list[WorkerProcess]:
    workers = [WorkerProcess(model_dir, log_dir) for _ in range(n)]
    for w in workers:
        w.wait()
    return workers


@pytest.fixture(scope="session")
def workers(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[WorkerProcess]]:
    started = start_workers(2, tiny_model_dir, tmp_path_factory.mktemp("worker-logs"))
    yield started
    for w in started:
        w.stop()


class GatewayServer:
    """The gateway app (flags as the command line has them) under uvicorn in a thread."""

    def __init__(self, argv: list[str], limits: TransportLimits | None = None) -> None:
        protocol, self.stats = guarded_protocol(limits or TransportLimits())
        self.gateway, app = build(parser().parse_args(argv), self.stats)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, http=protocol, log_config=None, lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()))
        self.port = 0

    def __enter__(self) -> GatewayServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def core(self) -> Gateway:
        return self.gateway


class FakeUpstream:
    """A starlette app under uvicorn in a thread, for faults a worker does not make on demand."""

    def __init__(self, app: Starlette) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()))

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self._thread.is_alive()
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"


def fake(handler: object) -> FakeUpstream:
    """An upstream whose /v1/completions is `handler` and whose /metrics is empty."""
    return FakeUpstream(
        Starlette(
            routes=[
                Route("/v1/completions", handler, methods=["POST"]),  # type: ignore[arg-type]
                Route("/metrics", lambda _: Response(""), methods=["GET"]),
            ]
        )
    )


@contextlib.contextmanager
def raw_upstream(answer: bytes) -> Iterator[str]:
    """A TCP server (its base URL) that reads each request and answers `answer` then closes:
    for bytes no HTTP server would send (garbage, a body shorter than it declares)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(10)

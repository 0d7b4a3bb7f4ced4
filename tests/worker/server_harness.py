"""Test harness: a real worker HTTP server on an ephemeral loopback port.

`InProcessServer` runs the real app under uvicorn in a background thread (its own event loop),
bound to 127.0.0.1 port 0, so tests talk to it over real TCP with real clients (the `openai`
package, httpx) and can also look at its state. `start_worker_process` starts the real
`llmos-worker serve` command as a subprocess, as a pod would run it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from llmos_worker.engine.config import EngineConfig
from llmos_worker.engine.outputs import RequestOutput
from llmos_worker.server.app import build_app
from llmos_worker.server.async_engine import Engine
from llmos_worker.server.auth import ApiKeyAuth
from llmos_worker.server.main import DrainingServer
from llmos_worker.server.ratelimit import RateLimiter
from llmos_worker.server.state import ServerState

VENV_BIN = Path(sys.executable).parent

# small, fast engine settings for the tiny model: room for a few hundred short sequences
TINY_ENGINE = EngineConfig(
    block_size=16,
    kv_cache_memory_bytes=16 * 1024 * 1024,
    max_num_seqs=256,
    max_num_batched_tokens=4096,
)


def engine_factory(source: str, config: EngineConfig = TINY_ENGINE) -> Callable[[], Engine]:
    def build() -> Engine:
        from llmos_worker.engine.engine import LLMEngine

        return LLMEngine.from_source(source, config)

    return build


class WrappedEngine:
    """The real engine with an optional delay per step and a failure after `fail_after` steps."""

    def __init__(
        self, engine: Any, *, step_delay_s: float = 0.0, fail_after: int | None = None
    ) -> None:
        self._engine = engine
        self.step_delay_s = step_delay_s
        self.fail_after = fail_after
        self.steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.fail_after is not None and self.steps > self.fail_after:
            raise RuntimeError("simulated device failure")
        time.sleep(self.step_delay_s)
        outputs: list[RequestOutput] = self._engine.step()
        return outputs


class InProcessServer:
    """The worker app under uvicorn in a thread; `with InProcessServer(...) as srv: srv.url`."""

    def __init__(
        self,
        loader: Callable[[], Engine],
        *,
        max_waiting_requests: int = 512,
        max_body_bytes: int = 1024 * 1024,
        served_model_name: str | None = None,
        auth: ApiKeyAuth | None = None,
        limiter: RateLimiter | None = None,
        drain_timeout_s: float | None = None,
        ready_timeout_s: float = 120.0,
        wait_ready: bool = True,
    ) -> None:
        self.state = ServerState(
            served_model_name=served_model_name,
            max_body_bytes=max_body_bytes,
            auth=auth,
            limiter=limiter,
        )
        self.app = build_app(self.state, loader=loader, max_waiting_requests=max_waiting_requests)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=0,
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        # with a drain timeout: the serve command's server, drained by `server.handle_exit(...)`
        self.server = (
            uvicorn.Server(config)
            if drain_timeout_s is None
            else DrainingServer(config, self.state, drain_timeout_s=drain_timeout_s)
        )
        self.ready_timeout_s = ready_timeout_s
        self.wait_ready = wait_ready
        self._thread = threading.Thread(target=self._serve, name="test-uvicorn", daemon=True)
        self.port = 0

    def _serve(self) -> None:
        asyncio.run(self.server.serve())

    def __enter__(self) -> InProcessServer:
        self._thread.start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not (self.server.started and (self.state.ready or not self.wait_ready)):
            if (self.wait_ready and self.state.load_error) or not self._thread.is_alive():
                raise RuntimeError(f"server failed to start: {self.state.load_error}")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become ready")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def wait_exited(self, timeout_s: float) -> bool:
        """Whether the server stopped on its own within `timeout_s` (e.g. after draining)."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        return self.state.model_name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_worker_process(
    args: list[str], *, port: int, env: dict[str, str] | None = None, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """`llmos-worker serve --port PORT ARGS...` as a subprocess (stderr to `log_path`)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    out: Any = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [
            str(VENV_BIN / "llmos-worker"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ],
        env=full_env,
        stdout=out,
        stderr=out,
    )


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} before becoming ready")
        try:
            if httpx.get(url + "/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("worker did not become ready")

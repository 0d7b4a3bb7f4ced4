"""SIGTERM on a real `llmos-worker serve` process: drain, then exit 0; and the drain deadline.

The worker is started exactly as a pod runs it (settings from environment variables). While a
streaming and a non-streaming request are in flight, SIGTERM arrives: `/ready` must turn 503 and
new completions be refused, both in-flight requests must complete in full, and the process must
exit with status 0.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.worker.server_harness import (
    InProcessServer,
    WrappedEngine,
    engine_factory,
    free_port,
    start_worker_process,
    wait_ready,
)

TOKENS = 600  # long enough to still be generating when SIGTERM lands


def test_sigterm_drains_in_flight_requests_and_exits_zero(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "LLMOS_MODEL": str(tiny_model_dir),
        "LLMOS_SERVED_MODEL_NAME": "tiny",
        "LLMOS_KV_CACHE_MEMORY_BYTES": str(16 * 1024 * 1024),
        "LLMOS_DRAIN_TIMEOUT": "60",
        "LLMOS_MAX_NUM_SEQS": "4",
    }
    log_path = tmp_path / "worker.log"
    proc = start_worker_process([], port=port, env=env, log_path=log_path)
    try:
        wait_ready(url, proc)
        body: dict[str, Any] = {
            "model": "tiny",
            "prompt": "tell me a story",
            "temperature": 0,
            "max_tokens": TOKENS,
            "ignore_eos": True,
        }
        first_chunk = threading.Event()
        results: dict[str, Any] = {}

        def streaming() -> None:
            texts, done = [], False
            with httpx.stream(
                "POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120
            ) as resp:
                for line in resp.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        texts.append(event["choices"][0]["text"] if event["choices"] else "")
                        first_chunk.set()
            results["stream"] = (resp.status_code, "".join(texts), done)

        def whole() -> None:
            resp = httpx.post(url + "/v1/completions", json=body, timeout=120)
            results["whole"] = (resp.status_code, resp.json())

        threads = [threading.Thread(target=streaming), threading.Thread(target=whole)]
        for t in threads:
            t.start()
        assert first_chunk.wait(60)
        # why: both requests must be in the engine before the signal, or one would be refused
        deadline = time.monotonic() + 30
        while (
            'llmos_num_requests_running{model_name="tiny"} 2.0'
            not in httpx.get(url + "/metrics").text
        ):
            assert time.monotonic() < deadline, "the two requests never ran together"
        proc.send_signal(signal.SIGTERM)

        ready = httpx.get(url + "/ready", timeout=10)
        refused = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 1}, timeout=10)
        for t in threads:
            t.join(120)
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    assert refused.status_code == 503 and "error" in refused.json()
    status, text, done = results["stream"]
    assert status == 200 and done and text
    status, whole_body = results["whole"]
    assert status == 200
    assert whole_body["usage"]["completion_tokens"] == TOKENS
    assert whole_body["choices"][0]["text"] == text  # same greedy request, both complete
    assert "draining" in log_path.read_text()


def test_invalid_setting_exits_non_zero_without_serving(tmp_path: Path) -> None:
    proc = start_worker_process(
        ["--block-size", "3"], port=free_port(), log_path=tmp_path / "worker.log"
    )
    assert proc.wait(timeout=60) == 2
    assert "block_size" in (tmp_path / "worker.log").read_text()


def test_drain_deadline_aborts_requests_still_running(tiny_model_dir: Path) -> None:
    build = engine_factory(str(tiny_model_dir))
    slow = InProcessServer(
        lambda: WrappedEngine(build(), step_delay_s=0.02),
        served_model_name="tiny",
        drain_timeout_s=0.5,
    )
    with slow as srv:
        events: list[str] = []
        payload = {
            "model": "tiny",
            "prompt": "hi",
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", srv.url + "/v1/completions", json=payload, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 1:
                        signalled = time.monotonic()
                        srv.server.handle_exit(signal.SIGTERM, None)
        elapsed = time.monotonic() - signalled
        assert srv.wait_exited(15), "the server did not exit after the drain deadline"
    # 400 tokens at >= 20 ms a step would take 8 s; the deadline cut it after 0.5 s
    assert elapsed < 5
    assert events[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(events[-2][len("data: ") :])["error"]["message"]

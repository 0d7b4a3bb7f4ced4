"""`llmos-worker serve` on an encrypted model directory, as a pod runs it.

The tiny model is fetched encrypted (the loader Job's layout). With the right key and digest the
real worker process serves it; with a wrong key, a tampered file or another model's digest the
process exits 1 with a message saying why, and `/ready` never answers 200.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from llmos_worker.storage import FetchRequest, fetch_model
from tests.worker.server_harness import free_port, start_worker_process, wait_ready

ENGINE_ENV = {
    "LLMOS_KV_CACHE_MEMORY_BYTES": str(16 * 1024 * 1024),
    "LLMOS_SERVED_MODEL_NAME": "tiny",
}


@pytest.fixture
def encrypted_model(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """(model dir on the 'volume', key file, model digest)."""
    kek = os.urandom(32)
    key_file = tmp_path / "kek"
    key_file.write_bytes(kek)
    dest = tmp_path / "volume" / "v1"
    manifest = fetch_model(
        FetchRequest(f"pvc://{tiny_model_dir.name}", dest, kek=kek, pvc_root=tiny_model_dir.parent)
    )
    return dest, key_file, manifest.digest


def run_until_exit(args: list[str], log_path: Path) -> tuple[int, str]:
    """Start the worker, poll /ready until it exits; fail if it ever became ready."""
    port = free_port()
    proc = start_worker_process(args, port=port, env=ENGINE_ENV, log_path=log_path)
    try:
        while proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1.0)
                assert ready.status_code != 200, "an unloadable model must never become ready"
            except httpx.TransportError:
                pass
            with contextlib.suppress(subprocess.TimeoutExpired):  # still running
                proc.wait(timeout=0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    return proc.returncode, log_path.read_text()


def test_serves_encrypted_model_with_the_right_key(
    encrypted_model: tuple[Path, Path, str], tmp_path: Path
) -> None:
    model_dir, key_file, digest = encrypted_model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--model", str(model_dir), "--model-key-file", str(key_file), "--model-digest", digest]
    proc = start_worker_process(args, port=port, env=ENGINE_ENV, log_path=tmp_path / "w.log")
    try:
        wait_ready(url, proc)
        reply = httpx.post(
            url + "/v1/completions",
            json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_wrong_key_refuses_to_start(
    encrypted_model: tuple[Path, Path, str], tmp_path: Path
) -> None:
    model_dir, _, digest = encrypted_model
    wrong = tmp_path / "wrong"
    wrong.write_bytes(os.urandom(32))
    code, log = run_until_exit(
        ["--model", str(model_dir), "--model-key-file", str(wrong), "--model-digest", digest],
        tmp_path / "w.log",
    )
    assert code == 1
    assert "key" in log.lower() and "failed to load" in log


def test_tampered_weights_refuse_to_start(
    encrypted_model: tuple[Path, Path, str], tmp_path: Path
) -> None:
    model_dir, key_file, _ = encrypted_model
    weights = next(model_dir.glob("*.safetensors.enc"))
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 3] ^= 0x01
    weights.write_bytes(bytes(blob))
    code, log = run_until_exit(
        ["--model", str(model_dir), "--model-key-file", str(key_file)], tmp_path / "w.log"
    )
    assert code == 1
    assert "failed to load" in log and ("tamper" in log.lower() or "integrity" in log.lower())


def test_another_models_digest_refuses_to_start(
    encrypted_model: tuple[Path, Path, str], tmp_path: Path
) -> None:
    model_dir, key_file, _ = encrypted_model
    code, log = run_until_exit(
        ["--model", str(model_dir), "--model-key-file", str(key_file), "--model-digest", "ab" * 32],
        tmp_path / "w.log",
    )
    assert code == 1
    assert "failed to load" in log and "digest" in log.lower()

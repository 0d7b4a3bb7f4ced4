"""Contract between the operator and the worker image: the Job and Deployment it renders run.

The loader container's command, args and env are taken verbatim from the loader Job rendered for
the sample LLMModel and run as a local process, which fills a local stand-in for the model volume.
Then the worker container's command, args and env are taken verbatim from the Deployment rendered
for the sample InferencePool (serving what that load produced) and started as a local process.
Only what a node would provide is substituted: the model volume's mount path (a temp dir) and a
free loopback port in place of the pod's own network namespace.
The memory limit a pod has is stood in for by an explicit KV cache size. Then a chat
completion is asked for through the Service-style base URL with the OpenAI client.
"""

from __future__ import annotations

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

from llmos_operator.api import InferencePoolSpec, LLMModelSpec
from llmos_operator.builders import (
    ModelRef,
    PoolRef,
    ServedModel,
    build_deployment,
    build_loader_job,
)
from llmos_operator.config import OperatorConfig

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sample(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "manifests" / "samples" / name).read_text()))


def rendered_loader() -> dict[str, Any]:
    """The loader container of the Job rendered for the sample model."""
    spec = LLMModelSpec.model_validate(sample("llmmodel.yaml")["spec"])
    job = build_loader_job(ModelRef("smollm2", "team-a", "uid"), spec, OperatorConfig())
    [container] = job["spec"]["template"]["spec"]["containers"]
    return dict(container)


def rendered_worker(served: ServedModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """(worker container, pod spec) of the Deployment rendered for the sample pool."""
    spec = InferencePoolSpec.model_validate(sample("inferencepool.yaml")["spec"])
    ref = PoolRef(name="chat", namespace="team-a", uid="uid")
    deployment = build_deployment(ref, spec, served, OperatorConfig())
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return container, pod


@pytest.mark.slow
def test_rendered_loader_and_worker_serve_a_chat_completion(tmp_path: Path) -> None:
    volume_dir = tmp_path / "models"  # local stand-in for the model PVC
    config = OperatorConfig()

    def local(arg: str) -> str:
        prefix = config.models_mount_path.rstrip("/") + "/"
        return str(volume_dir / arg[len(prefix) :]) if arg.startswith(prefix) else arg

    # 1. the loader Job's container fills the volume
    loader = rendered_loader()
    loader_args = [local(a) for a in loader["args"]]
    load_dir = Path(loader_args[loader_args.index("--dest") + 1])
    loader_env = {e["name"]: e["value"] for e in loader.get("env", []) if "value" in e}
    loader_env |= {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    loader_exe = shutil.which(loader["command"][0], path=str(Path(sys.executable).parent))
    assert loader_exe, f"{loader['command'][0]} is not installed"
    fetched = subprocess.run(
        [
            loader_exe,
            *loader["command"][1:],
            *loader_args,
            "--termination-log",
            str(tmp_path / "t"),
        ],
        env=loader_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    manifest = json.loads((load_dir / "manifest.json").read_text())
    assert json.loads((tmp_path / "t").read_text())["digest"] == manifest["digest"]

    # 2. the Deployment's worker container serves what the loader wrote
    served = ServedModel(
        "smollm2", "smollm2-weights", load_dir.name, manifest["version"], manifest["digest"]
    )
    container, pod = rendered_worker(served)
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "model"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "model"]
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    assert mount["mountPath"] == config.models_mount_path

    args = [local(a) for a in container["args"]]
    assert args[args.index("--model") + 1] == str(load_dir)
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    metrics_port = free_port()
    args[args.index("--metrics-port") + 1] = str(metrics_port)
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
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert metrics.status_code == 200 and "llmos_http_open_connections" in metrics.text
        # the API port does not serve the key-less metrics page
        assert httpx.get(base + "/metrics", timeout=5).status_code == 404
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()

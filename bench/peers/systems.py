"""The systems the peers benchmark serves: this worker in three weight modes, vLLM's CPU build in
two precisions and llama.cpp's `llama-server` with parallel slots.

A `System` says how to start the server (command and environment, with `{port}` where the port
goes), how to tell it is ready, and which request fields make it produce exactly `max_tokens`
tokens. Every system gets the same KV budget where it can be set (2 GiB: the worker's
`--kv-cache-memory-bytes`, vLLM's `VLLM_CPU_KVCACHE_SPACE`), 2 threads on this 2-core machine,
and its own defaults otherwise (prefix caching on for all three).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil

Kind = Literal["llmos", "vllm", "llama_server"]
KV_CACHE_GIB = 2
LLAMA_SLOTS = 16
LLAMA_CONTEXT = 32768  # shared by the 16 slots: 2,048 tokens each
THREADS = 2


@dataclass(frozen=True)
class System:
    """One server configuration. `precision` is the class the issue compares within."""

    name: str
    label: str
    kind: Kind
    precision: Literal["fp32", "bf16", "4-bit"]
    argv: tuple[str, ...]  # "{port}" stands for the port
    env: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""

    def command(self, port: int) -> list[str]:
        return [a.replace("{port}", str(port)) for a in self.argv]

    @property
    def ready_path(self) -> str:
        # why: the worker's /health answers before the engine is warm; /ready only after.
        # vLLM binds its port only once the engine is up; llama-server answers /health with
        # 503 while it loads the model.
        return "/ready" if self.kind == "llmos" else "/health"


def request_body(kind: Kind, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """The streaming /v1/completions body for one request, the same for every system except the
    names each one gives the "generate exactly max_tokens tokens" fields.

    Every system gets the prompt as token ids (the same tokenizer vocabulary everywhere, so the
    same prompt length), greedy sampling and `ignore_eos`; vLLM and this worker also get
    `min_tokens = max_tokens`, llama-server `n_predict = max_tokens` (its own name for the cap).
    """
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if kind in ("llmos", "vllm"):
        body["min_tokens"] = max_tokens
    elif kind == "llama_server":
        body["n_predict"] = max_tokens
    else:
        raise ValueError(f"unknown system kind {kind!r}")
    return body


@dataclass(frozen=True)
class Paths:
    """Where the peers live (built by install_vllm.sh / build_llama_server.sh / convert_hf.py)."""

    gguf: Path
    hf_dir: Path
    vllm_python: Path
    llama_server: Path
    worker_cli: Path


def default_paths() -> Paths:
    from bench.peers.convert_hf import bundled_gguf, cache_dir, default_hf_dir

    cache = cache_dir()
    return Paths(
        gguf=bundled_gguf(),
        hf_dir=default_hf_dir(),
        vllm_python=Path(os.environ.get("VLLM_VENV", cache / "vllm-venv")) / "bin" / "python",
        llama_server=Path(os.environ.get("LLAMA_SERVER_DIR", cache / "llama-server"))
        / "build"
        / "bin"
        / "llama-server",
        worker_cli=Path(sys.executable).with_name("llmos-worker"),
    )


def all_systems(paths: Paths, worker_src: Path | None = None) -> list[System]:
    """Worker fp32 / bf16 / int4, vLLM fp32 / bf16, llama-server Q4_1, in that order.

    `worker_src`: a directory holding an `llmos_worker` package to serve instead of the editable
    install's (put first on the worker's PYTHONPATH), e.g. a snapshot of one commit."""
    worker_env = {"PYTHONPATH": str(worker_src)} if worker_src is not None else {}
    kv_bytes = str(KV_CACHE_GIB * 2**30)
    worker = (
        str(paths.worker_cli),
        "serve",
        "--model",
        "builtin://smollm2-135m-instruct",
        "--served-model-name",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--kv-cache-memory-bytes",
        kv_bytes,
        "--log-level",
        "warning",
    )
    vllm = (
        str(paths.vllm_python),
        "-m",
        "vllm.entrypoints.openai.api_server",  # why: the `vllm` CLI looks up a "vllm" dist name
        "--model",
        str(paths.hf_dir),
        "--served-model-name",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--max-model-len",
        "4096",
        "--disable-uvicorn-access-log",
    )
    vllm_env = {
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{THREADS - 1}",
        "HF_HUB_OFFLINE": "1",
    }
    # why: vLLM's CPU guide asks for Intel's OpenMP preloaded (it warns without it); the wheel
    # ships it in the venv's lib/.
    iomp = paths.vllm_python.parent.parent / "lib" / "libiomp5.so"
    if iomp.is_file():
        vllm_env["LD_PRELOAD"] = str(iomp)
    llama = (
        str(paths.llama_server),
        "-m",
        str(paths.gguf),
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "-np",
        str(LLAMA_SLOTS),
        "-c",
        str(LLAMA_CONTEXT),
        "-t",
        str(THREADS),
        "-tb",
        str(THREADS),
        "--cont-batching",
        "--alias",
        "smollm2",
    )
    llama_notes = f"-np {LLAMA_SLOTS} -c {LLAMA_CONTEXT} -t {THREADS} --cont-batching"
    # why: on a CPU with AMX llama.cpp repacks the weights for its AMX matmul, which crashed
    # there (SIGSEGV in ggml_backend_amx_mul_mat, llama-cpp-python 0.3.36's llama.cpp, on the
    # first batch); without repacking it runs its AVX-512 / VNNI dot products
    if cpu_has("amx_tile"):
        llama = (*llama, "--no-repack")
        llama_notes += " --no-repack (its AMX path crashes on this CPU)"
    # why: the 16-bit and 4-bit modes keep K/V in 16 bits, as their peers do (vLLM bf16 caches
    # bf16, llama-server f16), so each pair reads the same bytes of KV a step; fp32 keeps fp32,
    # as vLLM fp32 does
    half_kv = ("--kv-cache-dtype", "float16")
    half_kv_note = f"`{' '.join(half_kv)}`"
    return [
        System(
            "llmos_fp32",
            "llmos worker, fp32",
            "llmos",
            "fp32",
            (*worker, "--dtype", "float32"),
            worker_env,
        ),
        System(
            "llmos_bf16",
            "llmos worker, bf16 weights",
            "llmos",
            "bf16",
            (*worker, "--quantization", "bf16", *half_kv),
            worker_env,
            notes=f"`--quantization bf16`, {half_kv_note}",
        ),
        System(
            "llmos_int4",
            "llmos worker, int4 weights",
            "llmos",
            "4-bit",
            (*worker, "--quantization", "int4", *half_kv),
            worker_env,
            notes=f"`--quantization int4` (the GGUF's Q4_1 blocks), {half_kv_note}",
        ),
        System(
            "vllm_fp32",
            "vLLM CPU 0.32.0, fp32",
            "vllm",
            "fp32",
            (*vllm, "--dtype", "float32"),
            vllm_env,
        ),
        System(
            "vllm_bf16",
            "vLLM CPU 0.32.0, bf16",
            "vllm",
            "bf16",
            (*vllm, "--dtype", "bfloat16"),
            vllm_env,
        ),
        System(
            "llama_server",
            "llama-server, Q4_1",
            "llama_server",
            "4-bit",
            llama,
            notes=llama_notes,
        ),
    ]


def cpu_has(flag: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU lists `flag` in /proc/cpuinfo (False where there is none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any(
        flag in line.split(":", 1)[1].split()
        for line in text.splitlines()
        if line.startswith("flags")
    )


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(pid: int) -> int:
    """RSS in bytes summed over a process and its descendants (cheap: /proc/PID/statm), counting
    pages that several processes of the tree share once per process."""
    total = 0
    for p in _tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over a process and all its descendants. PSS divides shared
    pages among the processes sharing them, so its sum is the tree's real footprint; it is 0
    where /proc/PID/smaps_rollup cannot be read. Why not sampled while driving: reading it walks
    every page table, which costs CPU the measured servers need on a 2-core machine."""
    procs = _tree(pid)
    return tree_rss(pid), sum(_pss(p.pid) for p in procs)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process tree so far (to show idle servers stay idle)."""
    total = 0.0
    for p in _tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


class MemorySampler:
    """Samples a process tree's RSS in a thread; `peak()` is the maximum since `reset()`."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self._peak_rss = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def reset(self) -> None:
        with self._lock:
            self._peak_rss = 0

    def peak(self) -> int:
        with self._lock:
            return self._peak_rss

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss(self.pid)
            with self._lock:
                self._peak_rss = max(self._peak_rss, rss)
            self._stop.wait(self.interval_s)


@dataclass
class RunningServer:
    system: System
    proc: subprocess.Popen[bytes]
    base: str
    model: str
    startup_s: float
    sampler: MemorySampler


def start_server(
    system: System, port: int, log_path: Path, ready_timeout_s: float = 900.0
) -> RunningServer:
    """Start one system's server and wait until it is ready; the time from spawn to the first
    ready answer is its startup time."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            system.command(port),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | dict(system.env),
            start_new_session=True,  # why: stopped as a group, children included
        )
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{system.name} exited with {proc.returncode}; see {log_path}")
            try:
                if httpx.get(base + system.ready_path, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > ready_timeout_s:
                raise RuntimeError(f"{system.name} not ready in {ready_timeout_s:.0f} s")
            time.sleep(0.1)
        startup = time.monotonic() - t0
        models = httpx.get(base + "/v1/models", timeout=10.0).json()
        model = str(models["data"][0]["id"])
    except BaseException:
        stop_server(proc)
        raise
    sampler = MemorySampler(proc.pid)
    sampler.start()
    return RunningServer(system, proc, base, model, startup, sampler)


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after `timeout_s`."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass

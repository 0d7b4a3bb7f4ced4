"""A local pool on loopback: worker processes of one model and an `llmos-gateway` in front.

    python -m bench.localpool --workers 2 --port 8000 --strategy prefix

(`make pool`) starts the workers (one thread each, a small KV cache, prefix caching on), waits
until each answers /ready, then starts the gateway over them and waits for it too. Ctrl-C or
SIGTERM stops all of them; so does any of them exiting. The gateway benchmark starts its
workers and gateways with the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

import httpx

BUILTIN = "builtin://smollm2-135m-instruct"
KV_MIB = 256  # why: ~5,800 tokens per worker in float32 (the context length is capped by it)


@dataclass
class Process:
    """One started server: what it is, its base URL, its process and where its log goes."""

    name: str
    url: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None

    def alive(self) -> bool:
        return self.popen.poll() is None


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _spawn(cmd: list[str], log_path: Path | None, env: dict[str, str]) -> subprocess.Popen[bytes]:
    out: IO[bytes] | None = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("wb")
    try:
        # why: a session of its own, so that a terminal's Ctrl-C reaches only this process,
        # which then stops each server once (SIGTERM: drain, exit); a second signal in the
        # middle of a server's shutdown cuts it short with a traceback
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            env=os.environ | {"HF_HUB_OFFLINE": "1"} | env,
            start_new_session=True,
        )
    finally:
        if out is not None:
            out.close()  # why: the child holds its own copy of the descriptor


def worker_command(
    model: str, port: int, *, kv_mib: int, max_num_seqs: int, extra: Sequence[str] = ()
) -> list[str]:
    """`llmos-worker serve` on 127.0.0.1:port with a KV cache of `kv_mib` MiB."""
    if kv_mib <= 0 or max_num_seqs <= 0:
        raise ValueError("the KV cache size and max_num_seqs must be positive")
    return [
        _bin("llmos-worker"),
        "serve",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-cache-memory-bytes",
        str(kv_mib * 2**20),
        "--max-num-seqs",
        str(max_num_seqs),
        "--enable-prefix-caching",
        "--no-access-log",
        *extra,
    ]


def gateway_command(
    replicas: Sequence[str], port: int, strategy: str, extra: Sequence[str] = ()
) -> list[str]:
    """`llmos-gateway` on 127.0.0.1:port over `replicas` (base URLs)."""
    if not replicas:
        raise ValueError("a gateway needs at least one replica")
    cmd = [_bin("llmos-gateway"), "--host", "127.0.0.1", "--port", str(port)]
    for url in replicas:
        cmd += ["--replica", url]
    return [*cmd, "--strategy", strategy, *extra]


def start(
    name: str, cmd: list[str], port: int, log_path: Path | None, threads: int | None = None
) -> Process:
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    return Process(name, f"http://127.0.0.1:{port}", _spawn(cmd, log_path, env), log_path)


def wait_ready(proc: Process, timeout_s: float = 300.0) -> None:
    """Block until `proc` answers GET /ready with 200; raise if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.alive():
            where = f"; see {proc.log_path}" if proc.log_path else ""
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}{where}")
        try:
            if httpx.get(proc.url + "/ready", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not ready in {timeout_s:.0f} s")
        time.sleep(0.3)


def stop(procs: Sequence[Process], grace_s: float = 20.0) -> None:
    """SIGTERM every process still running, then SIGKILL those left after `grace_s`."""
    for p in procs:
        if p.alive():
            p.popen.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()


@contextlib.contextmanager
def running(procs: list[Process]) -> Iterator[list[Process]]:
    """Stop every process of `procs` (which the body may extend) on the way out."""
    try:
        yield procs
    finally:
        stop(procs)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.localpool", description=__doc__)
    p.add_argument("--model", default=BUILTIN)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--worker-port", type=int, default=None, help="first worker's port (default: --port + 1)"
    )
    p.add_argument("--port", type=int, default=8000, help="the gateway's port")
    p.add_argument("--strategy", default="prefix", choices=("prefix", "round-robin", "least-load"))
    p.add_argument("--kv-mib", type=int, default=KV_MIB, help="each worker's KV cache (MiB)")
    p.add_argument("--threads", type=int, default=1, help="compute threads per worker")
    p.add_argument("--max-num-seqs", type=int, default=16)
    args = p.parse_args(argv)
    if args.workers < 1 or args.threads < 1:
        p.error("--workers and --threads must be at least 1")
    if args.worker_port is None:
        args.worker_port = args.port + 1
    ports = [args.port, *range(args.worker_port, args.worker_port + args.workers)]
    if len(set(ports)) != len(ports) or not all(0 < port < 65536 for port in ports):
        p.error(f"ports {ports} must be distinct and in 1..65535")
    return args


def ready_message(gateway: str, strategy: str, workers: Sequence[str], model: str) -> str:
    """What `make pool` prints once everything answers: the URLs and a request to try."""
    name = model.removeprefix("builtin://")
    return (
        f"pool ready: gateway {gateway} ({strategy} routing) over {', '.join(workers)}\n"
        f"try: curl -s {gateway}/v1/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello"}}], '
        f'"max_tokens": 32}}\'\n'
        "Ctrl-C stops the pool"
    )


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    try:
        with running([]) as procs:
            for i in range(args.workers):
                port = args.worker_port + i
                cmd = worker_command(
                    args.model, port, kv_mib=args.kv_mib, max_num_seqs=args.max_num_seqs
                )
                procs.append(start(f"worker-{i + 1}", cmd, port, None, args.threads))
            for p in procs:
                wait_ready(p)
            gw = gateway_command([p.url for p in procs], args.port, args.strategy)
            procs.append(start("gateway", gw, args.port, None))
            wait_ready(procs[-1], 30.0)
            workers = [p.url for p in procs[:-1]]
            print(
                ready_message(procs[-1].url, args.strategy, workers, args.model),
                file=sys.stderr,
                flush=True,
            )
            while all(p.alive() for p in procs):
                time.sleep(0.5)
            dead = [p.name for p in procs if not p.alive()]
            print(f"{', '.join(dead)} exited; stopping the pool", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError) as exc:
        print(f"pool: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m bench.peers.run --out docs`: this worker against vLLM's CPU build and llama-server
(the Makefile's `make bench-peers`, which builds the peers first).

Each system's server is started alone (startup time to ready, idle memory and idle CPU measured
then), and all stay up; then for every scenario and repeat the systems take turns in an order
that rotates by repeat, driven by one httpx client, while a sampler follows the driven server's
memory. A system that cannot be started is recorded with its error and the others are measured.
Writes `<out>/bench/peers.json` and the peers section of `<out>/benchmarks.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench import corpus, hf_baseline
from bench.peers import driver, report, scenarios
from bench.peers.systems import (
    KV_CACHE_GIB,
    MemorySampler,
    RunningServer,
    System,
    all_systems,
    default_paths,
    start_server,
    stop_server,
    tree_cpu_seconds,
    tree_memory,
)
from bench.run import git_revision, machine
from bench.serving import free_port
from bench.workload import BenchRequest

log = logging.getLogger("bench.peers")
IDLE_SETTLE_S = 3.0
IDLE_CPU_WINDOW_S = 5.0


def uptime() -> str:
    """`uptime`'s line (load averages included), or the load averages alone without it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def rotated(items: list[str], k: int) -> list[str]:
    """`items` rotated left by k (repeat k starts with a different system)."""
    if not items:
        return []
    k %= len(items)
    return items[k:] + items[:k]


def snapshot_worker(dest: Path) -> str:
    """Extract the worker package as committed at HEAD into `dest`; the commit's short hash.

    Why: other work may have uncommitted edits of the worker in this tree; a benchmark run must
    measure one commit, which the report can name."""
    root = Path(__file__).resolve().parents[2]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", commit, "worker/llmos_worker"], capture_output=True, check=True, cwd=root
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def token_pool() -> list[int]:
    tok = hf_baseline.load_tokenizer(default_paths().gguf)
    return corpus.token_pool(lambda s: list(tok.encode(s, add_special_tokens=False)))


def start_all(
    systems: list[System], logs: Path, results: dict[str, Any]
) -> dict[str, RunningServer]:
    """Start each system alone; record startup time, idle RSS/PSS and idle CPU."""
    running: dict[str, RunningServer] = {}
    for system in systems:
        entry = results["systems"][system.name]
        log.info("starting %s", system.name)
        try:
            server = start_server(system, free_port(), logs / f"{system.name}.log")
        except Exception as exc:  # why: a peer that cannot start is reported, the rest measured
            log.error("%s did not start: %s", system.name, traceback.format_exc())
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        time.sleep(IDLE_SETTLE_S)
        entry["startup_s"] = round(server.startup_s, 2)
        entry["idle_rss"], entry["idle_pss"] = tree_memory(server.proc.pid)
        cpu0 = tree_cpu_seconds(server.proc.pid)
        time.sleep(IDLE_CPU_WINDOW_S)
        cpu1 = tree_cpu_seconds(server.proc.pid)
        entry["idle_cpu_percent"] = round(100.0 * (cpu1 - cpu0) / IDLE_CPU_WINDOW_S, 1)
        entry["model"] = server.model
        log.info(
            "%s ready in %.1f s, idle RSS %.0f MiB",
            system.name,
            server.startup_s,
            entry["idle_rss"] / 2**20,
        )
        running[system.name] = server
    return running


async def drive(
    running: dict[str, RunningServer],
    names: list[str],
    scenario_names: list[str],
    repeats: int,
    pool: list[int],
    smoke: bool,
    results: dict[str, Any],
    on_progress: Callable[[], None] | None = None,
) -> None:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        for name in names:  # warm-up, not timed: one short request each
            s = running[name]
            warm = BenchRequest("warmup", pool[:16], 4)
            await driver.run_requests(client, s.base, s.system.kind, s.model, [warm])
        for scen in scenario_names:
            for rep in range(repeats):
                requests = scenarios.build(scen, pool, rep)
                if smoke:
                    requests = scenarios.shrink(requests, limit=4, max_output=16)
                for name in rotated(names, rep):
                    s = running[name]
                    if s.proc.poll() is not None:
                        results["notes"].append(f"{name} exited during {scen} repeat {rep}")
                        continue
                    load = round(os.getloadavg()[0], 2)
                    sampler = MemorySampler(s.proc.pid)
                    sampler.start()
                    cpu0 = time.process_time()
                    timings, wall = await driver.run_requests(
                        client, s.base, s.system.kind, s.model, requests
                    )
                    client_cpu = time.process_time() - cpu0
                    sampler.stop()
                    stats = driver.run_stats(timings, requests, wall)
                    stats["load_1m_before"] = load
                    stats["client_cpu_s"] = round(client_cpu, 2)
                    results["scenarios"].setdefault(scen, {}).setdefault(name, []).append(stats)
                    entry = results["systems"][name]
                    entry["peak_rss"] = max(int(entry.get("peak_rss", 0)), sampler.peak())
                    results["load"].append(
                        {"scenario": scen, "repeat": rep, "system": name, "load_1m": load}
                    )
                    log.info(
                        "%s rep %d %s: %.1f tok/s, TTFT p50 %.0f ms, ITL p99 %.1f ms%s",
                        scen,
                        rep,
                        name,
                        stats["output_throughput"],
                        stats["ttft"]["median_ms"],
                        stats["itl"]["p99_ms"],
                        f", {stats['failed']} failed {stats['errors']}" if stats["failed"] else "",
                    )
                if on_progress is not None:
                    on_progress()


def measure_roofline(results: dict[str, Any], pool: list[int]) -> None:
    """The machine's rates (the better of this and an earlier measurement of the run) and the
    ceilings they put on the offline-mixed (repeat 0's requests) and single-stream workloads."""
    from bench import roofline
    from bench.peers.convert_hf import bundled_gguf

    size = roofline.gguf_model_size(bundled_gguf())
    roof = roofline.measure(size, previous=results.get("roofline"))
    roof["workloads"] = {
        name: roofline.workload_ceiling(
            size,
            [(len(r.prompt_token_ids), r.max_tokens) for r in scenarios.build(name, pool, 0)],
            roof["matmul_gflops_fp32"],
            roof["matmul_gops_int8_native"],
            roof["matmul_gflops_bf16_best"],
        )
        for name in ("offline_mixed", "single_stream")
    }
    results["roofline"] = roof


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.peers.run", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("docs"), help="docs folder to write into")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems", nargs="*", default=None, help="a subset of system names")
    ap.add_argument("--scenarios", nargs="*", default=None, choices=scenarios.SCENARIOS)
    ap.add_argument("--smoke", action="store_true", help="4 requests, 16 tokens, for a try-out")
    ap.add_argument("--no-doc", action="store_true", help="write the JSON only")
    ap.add_argument(
        "--worker-from-tree",
        action="store_true",
        help="serve the worker as it is in the working tree (default: as committed at HEAD)",
    )
    ap.add_argument("--logs", type=Path, default=Path("bench/results/tmp/peers"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    worker_src: Path | None = None
    commit = git_revision()
    if not args.worker_from_tree:
        snap = Path(tempfile.mkdtemp(prefix="llmos-peers-worker-"))
        commit = snapshot_worker(snap)
        worker_src = snap / "worker"
    systems = all_systems(default_paths(), worker_src)
    if args.systems:
        unknown = set(args.systems) - {s.name for s in systems}
        if unknown:
            raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))}")
        systems = [s for s in systems if s.name in args.systems]
    scenario_names = list(args.scenarios or scenarios.SCENARIOS)
    results: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit,
            "worker_source": "the working tree" if worker_src is None else f"git HEAD ({commit})",
            "machine": machine(),
            "uptime_before": uptime(),
            "repeats": args.repeats,
            "smoke": args.smoke,
            "setup": (
                f"KV budget {KV_CACHE_GIB} GiB for the worker (`--kv-cache-memory-bytes`) and vLLM "
                "(`VLLM_CPU_KVCACHE_SPACE`); 2 threads everywhere (vLLM: "
                "`VLLM_CPU_OMP_THREADS_BIND=0-1`); prefix caching at each system's default (on); "
                "vLLM serves an HF copy of the GGUF dequantised to fp32 (bench/peers/convert_hf.py)"
            ),
            "python": sys.version.split()[0],
        },
        "systems": {
            s.name: {
                "label": s.label,
                "kind": s.kind,
                "precision": s.precision,
                "notes": s.notes,
                "command": s.command(0),
                "env": dict(s.env),
            }
            for s in systems
        },
        "scenarios": {},
        "scenarios_run": scenario_names,
        "load": [],
        "notes": [],
    }

    def write() -> None:
        """The JSON and the doc section from what has been measured so far (after every
        scenario repeat, so that a run cut short still leaves its numbers)."""
        results["meta"]["uptime_after"] = uptime()
        results["medians"] = {
            scen: {name: report.medians(runs) for name, runs in per.items()}
            for scen, per in results["scenarios"].items()
        }
        results["targets"] = [t.as_dict() for t in report.evaluate(results)]
        out_json = args.out / "bench" / "peers.json"
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1) + "\n")
        if not args.no_doc:
            doc_path = args.out / "benchmarks.md"
            doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
            doc_path.write_text(report.update_doc(doc, report.render(results)))

    log.info("tokenizing the corpus")
    pool = token_pool()
    log.info("measuring the machine's roofline (before any server starts)")
    measure_roofline(results, pool)
    running = start_all(systems, args.logs, results)
    try:
        names = [s.name for s in systems if s.name in running]
        asyncio.run(
            drive(running, names, scenario_names, args.repeats, pool, args.smoke, results, write)
        )
    finally:
        for server in running.values():
            stop_server(server.proc)
    log.info("measuring the machine's roofline again (servers stopped)")
    measure_roofline(results, pool)
    results["meta"]["complete"] = True
    write()
    log.info("wrote %s", args.out / "bench" / "peers.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

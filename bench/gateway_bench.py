"""Prefix-aware routing vs round-robin through `llmos-gateway`, and the gateway's own cost.

`python -m bench.gateway_bench [--out docs]` (make bench-gateway), on loopback:
1. Starts `--workers` worker processes of the bundled model (one thread each, a small KV cache, so
   that a worker can hold the prefixes of its share of the sessions but not of all of them) and
   one gateway per strategy over the same workers.
2. Repeats, interleaved with the strategy order rotated: the chat-session workload
   (`bench.gateway_workload`) through each gateway, first saturated (every session at once, a
   fixed number of requests in flight), then paced (sessions starting one by one, a user's think
   time between turns); per run mean and p90 TTFT, output tokens/s and each worker's
   prefix-cache hit rate (its /metrics counters before and after the run).
3. Overhead: a cheap request (a completion of 1 token, and GET /v1/models) many times,
   alternating direct to a worker and through a gateway over that worker alone; the median of
   the per-pair added latency.
4. Max rate: a gateway in front of a fake upstream that answers at once, loaded by a raw-socket
   client (`bench.gateway_load`), each in its own process; also the client direct to the upstream.
Writes `<out>/bench/gateway.json` and the gateway section of `<out>/benchmarks.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from bench import gateway_report as report
from bench import gateway_workload as wl
from bench import localpool
from bench.corpus import corpus_text
from bench.metrics import RequestTiming
from bench.peers.run import rotated, uptime
from bench.run import git_revision, machine
from bench.serving import free_port

log = logging.getLogger("bench.gateway")


# ---------------------------------------------------------------- the session workload
async def _session(
    client: httpx.AsyncClient,
    base: str,
    model: str,
    session: wl.Session,
    max_tokens: int,
    gate: asyncio.Semaphore,
    timings: list[RequestTiming],
    prompt_tokens: list[int],
    *,
    start_s: float = 0.0,
    think_s: float = 0.0,
) -> None:
    """The session's turns in order; `start_s` after the run starts, `think_s` between a reply
    and the next turn (a user reading and typing)."""
    replies: list[str] = []
    if start_s > 0:
        await asyncio.sleep(start_s)
    for turn in range(len(session.users)):
        if turn and think_s > 0:
            await asyncio.sleep(think_s)
        body = wl.chat_body(model, wl.messages(session, replies), max_tokens)
        async with gate:
            timing = RequestTiming(f"{session.sid}/{turn}", 0, time.perf_counter())
            text, count = [], None
            try:
                async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        timing.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    else:
                        async for line in r.aiter_lines():
                            if not line.startswith("data:"):
                                continue
                            data = line[5:].strip()
                            if data == "[DONE]":
                                break
                            piece, done, prompt = wl.parse_chunk(data)
                            if piece:
                                timing.chunk_times.append(time.perf_counter())
                                text.append(piece)
                            if done is not None:
                                count = done
                            if prompt is not None:
                                timing.prompt_len = prompt
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                timing.error = f"{type(exc).__name__}: {exc}"
        timing.output_len = count if count is not None else len(timing.chunk_times)
        timings.append(timing)
        if timing.error:
            return  # why: the next turn would need this turn's reply
        if turn == 0:
            prompt_tokens.append(timing.prompt_len)
        replies.append("".join(text))


def scrape(workers: Sequence[localpool.Process]) -> list[dict[str, float]]:
    return [wl.prefix_counters(httpx.get(w.url + "/metrics", timeout=10).text) for w in workers]


@dataclass(frozen=True)
class Mode:
    """How a run's sessions arrive: all at once with at most `concurrency` requests in flight
    (saturated), or one every `stagger_s` with `think_s` between turns and no cap (paced)."""

    name: str
    sessions: int
    turns: int
    concurrency: int
    stagger_s: float = 0.0
    think_s: float = 0.0


def modes(args: argparse.Namespace) -> list[Mode]:
    out = [Mode("saturated", args.sessions, args.turns, args.concurrency)]
    if args.paced_repeats > 0:
        n = args.paced_sessions
        out.append(Mode("paced", n, args.paced_turns, n, args.stagger_s, args.think_s))
    return out


async def _drive(
    base: str, sessions: list[wl.Session], mode: Mode, max_tokens: int
) -> dict[str, Any]:
    timings: list[RequestTiming] = []
    prompts: list[int] = []
    gate = asyncio.Semaphore(mode.concurrency)
    limits = httpx.Limits(max_connections=mode.concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        model = (await client.get(base + "/v1/models")).json()["data"][0]["id"]
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                _session(
                    client,
                    base,
                    model,
                    s,
                    max_tokens,
                    gate,
                    timings,
                    prompts,
                    start_s=i * mode.stagger_s,
                    think_s=mode.think_s,
                )
                for i, s in enumerate(sessions)
            )
        )
        wall = time.perf_counter() - t0
    out = wl.run_stats(timings, wall)
    out["system_prompt_tokens_mean"] = round(sum(prompts) / len(prompts), 1) if prompts else None
    return out


def run_strategy(
    name: str,
    gateway: localpool.Process,
    workers: Sequence[localpool.Process],
    salt: str,
    text: str,
    args: argparse.Namespace,
    mode: Mode,
) -> dict[str, Any]:
    sessions = wl.make_sessions(
        text,
        sessions=mode.sessions,
        turns=mode.turns,
        system_chars=args.system_chars,
        user_chars=args.user_chars,
        salt=salt,
    )
    load = os.getloadavg()[0]
    before = scrape(workers)
    routed = wl.routing_outcomes(httpx.get(gateway.url + "/metrics", timeout=10).text)
    stats = asyncio.run(_drive(gateway.url, sessions, mode, args.max_tokens))
    after = scrape(workers)
    stats["routing"] = wl.outcome_shares(
        routed, wl.routing_outcomes(httpx.get(gateway.url + "/metrics", timeout=10).text)
    )
    per = [wl.hit_rate(b, a) for b, a in zip(before, after, strict=True)]
    stats["per_replica_hit_rate"] = [None if v is None else round(v, 3) for v in per]
    total = {k: sum(a[k] - b[k] for b, a in zip(before, after, strict=True)) for k in before[0]}
    stats["hit_rate"] = (
        round(total[wl.HITS] / total[wl.QUERIES], 3) if total[wl.QUERIES] > 0 else None
    )
    stats["load_1m_before"] = round(load, 2)
    stats["per_replica_prompt_tokens"] = [
        int(a[wl.QUERIES] - b[wl.QUERIES]) for b, a in zip(before, after, strict=True)
    ]
    # why: the prefill work the workers did; at a fixed concurrency TTFT follows it
    stats["computed_prompt_tokens"] = int(total[wl.QUERIES] - total[wl.HITS])
    log.info(
        "%s, %s (%s): mean TTFT %.0f ms, p90 %.0f ms, %.1f tok/s, hit rate %s, routing %s, "
        "failed %d",
        mode.name,
        name,
        salt,
        stats["ttft_mean_ms"],
        stats["ttft_p90_ms"],
        stats["output_tok_s"],
        stats["hit_rate"],
        stats["routing"],
        stats["failed"],
    )
    return stats


# ---------------------------------------------------------------- overhead and max rate
def overhead(direct: str, gateway: str, pairs: int) -> dict[str, Any]:
    """Interleaved direct/gateway timings of a 1-token completion and of GET /v1/models."""
    out: dict[str, Any] = {}
    with httpx.Client(timeout=60) as c_direct, httpx.Client(timeout=60) as c_gw:
        model = c_direct.get(direct + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0}
        for what, method, path, payload in (
            ("completion", "POST", "/v1/completions", body),
            ("models", "GET", "/v1/models", None),
        ):
            samples: dict[str, list[float]] = {"direct": [], "gateway": []}
            order = [("direct", c_direct, direct), ("gateway", c_gw, gateway)]
            for i in range(pairs + 5):
                for label, client, base in order if i % 2 else order[::-1]:
                    t = time.perf_counter()
                    r = client.request(method, base + path, json=payload)
                    elapsed = time.perf_counter() - t
                    if r.status_code != 200:
                        raise RuntimeError(f"{label} {path}: HTTP {r.status_code} {r.text[:200]}")
                    if i >= 5:  # why: the first few warm the connections and the engine
                        samples[label].append(elapsed)
            out[what] = report.paired_overhead_ms(samples["direct"], samples["gateway"])
    return out


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(url: str, connections: int, seconds: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.gateway_load", "drive", "--url", url]
    cmd += ["--connections", str(connections), "--seconds", str(seconds)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 120)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def max_rate(
    logs: Path, connections: Sequence[int], seconds: float, pairs: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Requests/s through a gateway over the fake upstream at each client connection count
    (and the same client direct to the upstream), with the gateway's CPU per request; and the
    added latency of `pairs` interleaved requests on an upstream that costs nothing."""
    up_port, gw_port = free_port(), free_port()
    up_cmd = [sys.executable, "-m", "bench.gateway_load", "upstream", "--port", str(up_port)]
    upstream = localpool.start("fake-upstream", up_cmd, up_port, logs / "fake-upstream.log")
    with localpool.running([upstream]) as procs:
        localpool.wait_ready(upstream, 30)
        gw_cmd = localpool.gateway_command(
            [upstream.url], gw_port, "prefix", ["--no-access-log", "--log-level", "warning"]
        )
        gw = localpool.start("gateway-fake", gw_cmd, gw_port, logs / "gateway-fake.log")
        procs.append(gw)
        localpool.wait_ready(gw, 30)
        added = overhead(upstream.url, gw.url, pairs)
        _load(gw.url, max(connections), 1.0)  # warm-up
        sweep: list[dict[str, Any]] = []
        for n in connections:
            load = os.getloadavg()[0]
            cpu0 = _cpu_s(gw.popen.pid)
            through = _load(gw.url, n, seconds)
            cpu = _cpu_s(gw.popen.pid) - cpu0
            direct = _load(upstream.url, n, seconds)
            sweep.append(report.rate_point(n, through, direct, cpu, load))
            log.info(
                "%d connections: %.0f requests/s through the gateway, %.0f direct",
                n,
                through["requests_per_s"],
                direct["requests_per_s"],
            )
    return {"seconds": seconds, "sweep": sweep, **report.best_rate(sweep)}, added


# ---------------------------------------------------------------- main
def changed_files() -> list[str]:
    """Tracked files that differ from the commit (the `+dirty` of the revision)."""
    done = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    return [line[3:] for line in done.stdout.splitlines() if len(line) > 3]


def kv_tokens(log_path: Path | None) -> int | None:
    """Tokens the worker's KV cache holds, from its start-up log line."""
    if log_path is None or not log_path.exists():
        return None
    m = re.search(r"KV cache: (\d+) blocks of (\d+) tokens", log_path.read_text(errors="replace"))
    return int(m.group(1)) * int(m.group(2)) if m else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gateway_bench", description=__doc__)
    a = p.add_argument
    a("--out", type=Path, default=None, help="write bench/gateway.json and benchmarks.md here")
    a("--model", default=localpool.BUILTIN)
    a("--workers", type=int, default=3)
    a("--kv-mib", type=int, default=300, help="each worker's KV cache (MiB)")
    a("--threads", type=int, default=1)
    a(
        "--strategies",
        default="prefix,round-robin",
        help="comma-separated; least-load may be added (each one adds a third to the run time)",
    )
    a("--sessions", type=int, default=12)
    a("--turns", type=int, default=8, help="saturated runs (the paced ones: --paced-turns)")
    a("--system-chars", type=int, default=3400, help="system prompt length (~800 tokens)")
    a("--user-chars", type=int, default=160)
    a("--max-tokens", type=int, default=24)
    a("--concurrency", type=int, default=6, help="saturated runs: requests in flight")
    a("--repeats", type=int, default=2, help="saturated runs per strategy")
    a("--paced-repeats", type=int, default=2, help="paced runs per strategy (0: none)")
    a("--paced-sessions", type=int, default=12)
    a("--paced-turns", type=int, default=8)
    a("--think-s", type=float, default=8.0, help="paced runs: seconds between reply and turn")
    a("--stagger-s", type=float, default=2.0, help="paced runs: seconds between session starts")
    a("--overhead-pairs", type=int, default=200)
    a("--rate-connections", default="1,8,32", help="client connection counts, comma-separated")
    a("--rate-seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if "prefix" not in names or "round-robin" not in names:
        p.error("--strategies must include prefix and round-robin (the targets compare them)")
    if args.workers < 2 or args.repeats < 1 or args.concurrency < 1:
        p.error("--workers must be >= 2, --repeats and --concurrency >= 1")
    if args.paced_repeats < 0 or args.paced_sessions < 1 or args.paced_turns < 1:
        p.error("--paced-repeats must be >= 0, --paced-sessions and --paced-turns >= 1")
    if args.think_s < 0 or args.stagger_s < 0:
        p.error("--think-s and --stagger-s must not be negative")
    args.strategy_names = names
    try:
        args.rate_connection_counts = report.parse_counts(args.rate_connections)
    except ValueError as exc:
        p.error(f"--rate-connections: {exc}")
    return args


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    # why: SIGTERM must still run the `finally` that stops the workers and gateways started here
    signal.signal(signal.SIGTERM, _raise_exit)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # why: one line per request otherwise
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv_list)
    text = corpus_text()
    meta: dict[str, Any] = {
        "command": " ".join(["python -m bench.gateway_bench", *argv_list]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_revision(),
        "tracked_files_changed": changed_files(),
        "machine": machine(),
        "load_before": [round(v, 2) for v in os.getloadavg()],
        "uptime_before": uptime(),
    }
    run_modes = modes(args)
    results: dict[str, Any] = {
        "meta": meta,
        "runs": {n: [] for n in args.strategy_names},
        "paced_runs": {n: [] for n in args.strategy_names},
    }
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        logs = Path(tmp)
        with localpool.running([]) as procs:
            for i in range(args.workers):
                port = free_port()
                cmd = localpool.worker_command(
                    args.model, port, kv_mib=args.kv_mib, max_num_seqs=args.concurrency + 2
                )
                procs.append(
                    localpool.start(f"worker-{i}", cmd, port, logs / f"w{i}.log", args.threads)
                )
            workers = list(procs)
            for w in workers:
                localpool.wait_ready(w)
            gateways: dict[str, localpool.Process] = {}
            for name in args.strategy_names:
                port = free_port()
                cmd = localpool.gateway_command(
                    [w.url for w in workers], port, name, ["--no-access-log"]
                )
                gateways[name] = localpool.start(f"gw-{name}", cmd, port, logs / f"{name}.log")
                procs.append(gateways[name])
                localpool.wait_ready(gateways[name], 30)
            for mode in run_modes:
                key = "runs" if mode.name == "saturated" else "paced_runs"
                repeats = args.repeats if mode.name == "saturated" else args.paced_repeats
                for rep in range(repeats):
                    for k, name in enumerate(rotated(args.strategy_names, rep)):
                        salt = f"{mode.name[0]}{rep}{k}{int(time.time()) % 10000}"
                        results[key][name].append(
                            run_strategy(name, gateways[name], workers, salt, text, args, mode)
                        )
            # why: the strategies' gateways scrape every worker each second; stopped, they
            # leave the machine as quiet for the overhead pairs as for the direct requests
            localpool.stop(list(gateways.values()))
            # why: a gateway over workers[0] alone, so that both paths end at the same worker
            port = free_port()
            cmd = localpool.gateway_command([workers[0].url], port, "prefix", ["--no-access-log"])
            solo = localpool.start("gw-overhead", cmd, port, logs / "overhead.log")
            procs.append(solo)
            localpool.wait_ready(solo, 30)
            log.info("overhead: %d interleaved pairs", args.overhead_pairs)
            results["overhead"] = overhead(workers[0].url, solo.url, args.overhead_pairs)
            kv = kv_tokens(workers[0].log_path)
        log.info("max rate against a fake upstream")
        results["max_rps"], results["overhead_fake_upstream"] = max_rate(
            logs, args.rate_connection_counts, args.rate_seconds, 2 * args.overhead_pairs
        )
    system_tokens = [
        r["system_prompt_tokens_mean"]
        for key in ("runs", "paced_runs")
        for rs in results[key].values()
        for r in rs
    ]
    results["workload"] = {
        "model": args.model,
        "workers": args.workers,
        "threads": args.threads,
        "kv_mib": args.kv_mib,
        "kv_tokens": kv,
        "sessions": args.sessions,
        "turns": args.turns,
        "system_chars": args.system_chars,
        "system_tokens": round(sum(t for t in system_tokens if t) / len(system_tokens))
        if system_tokens and all(system_tokens)
        else None,
        "user_chars": args.user_chars,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "paced": {
            "sessions": args.paced_sessions,
            "turns": args.paced_turns,
            "think_s": args.think_s,
            "stagger_s": args.stagger_s,
            "repeats": args.paced_repeats,
        }
        if args.paced_repeats
        else None,
    }
    results["medians"] = {n: report.medians(rs) for n, rs in results["runs"].items()}
    results["paced_medians"] = (
        {n: report.medians(rs) for n, rs in results["paced_runs"].items()}
        if args.paced_repeats
        else {}
    )
    for key, runs_key in (("per_replica_hit_rate", "runs"), ("paced_per_replica", "paced_runs")):
        results[key] = {
            n: [
                report.medians([{"hit_rate": r["per_replica_hit_rate"][i]} for r in rs])["hit_rate"]
                for i in range(args.workers)
            ]
            for n, rs in results[runs_key].items()
            if rs
        }
    meta["load_after"] = [round(v, 2) for v in os.getloadavg()]
    meta["uptime_after"] = uptime()
    failed = sum(
        r["failed"] for key in ("runs", "paced_runs") for rs in results[key].values() for r in rs
    )
    if failed:
        notes.append(f"{failed} requests failed; their errors are in gateway.json")
    results["targets"] = report.targets(results)
    results["notes"] = notes + report.explain(results)
    for t in results["targets"]:
        verdict = "met" if t["met"] else "NOT met"
        print(f"{t['target']}: measured {t['measured']} (target {t['required']}): {verdict}")
    print(json.dumps(results["medians"], indent=1))
    if args.out:
        path = args.out / "bench" / "gateway.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        doc_path = args.out / "benchmarks.md"
        doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
        doc_path.write_text(report.update_doc(doc, report.render(results)))
        log.info("wrote %s and %s", path, doc_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

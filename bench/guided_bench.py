"""Throughput cost of grammar-constrained decoding: one batch of 16, with and without a schema.

`python -m bench.guided_bench [--out docs]` runs the bundled model offline (the engine, no HTTP)
on 16 chat prompts generating 128 tokens each, three times unconstrained and three times with a
JSON schema (an array of at least 64 records, so the grammar never ends before 128 tokens and
both runs make the same number of tokens), interleaved, and reports median tokens/s of each and the
loss. The mask is computed by llguidance per constrained row and applied in one masked fill.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.run import gguf_path
from llmos_worker.engine import EngineConfig, LLMEngine, SamplingParams
from llmos_worker.engine.guided import Guide

BATCH, TOKENS, REPEATS = 16, 128, 3
SCHEMA = {
    "type": "array",
    "minItems": 64,  # why: the grammar cannot end within 128 tokens; both runs make 2,048
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "role": {"enum": ["admin", "user", "guest"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        },
        "required": ["name", "role", "age", "tags"],
        "additionalProperties": False,
    },
}


def run(engine: LLMEngine, prompts: list[list[int]], guide: Guide | None) -> tuple[float, int]:
    params = SamplingParams(
        max_tokens=TOKENS, min_tokens=TOKENS, temperature=0.7, seed=1, ignore_eos=True, guide=guide
    )
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="write guided.json under OUT/bench")
    args = parser.parse_args()
    engine = LLMEngine.from_source(
        str(gguf_path()), EngineConfig(max_num_seqs=BATCH, max_model_len=1024)
    )
    tok = engine.tokenizer
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"List the members of team {i} as JSON records."}]
        )
        for i in range(BATCH)
    ]
    guide = Guide.json_schema(SCHEMA, "bench")
    run(engine, prompts[:2], guide)  # warm-up: the tokenizer index and the compiled grammar
    rates: dict[str, list[float]] = {"plain": [], "json_schema": []}
    counts: dict[str, int] = {}
    for _ in range(REPEATS):
        for name, g in (("plain", None), ("json_schema", guide)):
            elapsed, tokens = run(engine, prompts, g)
            rates[name].append(tokens / elapsed)
            counts[name] = tokens
    plain, guided = (statistics.median(rates[k]) for k in ("plain", "json_schema"))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    result: dict[str, Any] = {
        "commit": commit,
        "load_average": os.getloadavg(),
        "batch": BATCH,
        "tokens_per_request": TOKENS,
        "tokens": counts,
        "tokens_per_s": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        "median_tokens_per_s": {"plain": round(plain, 1), "json_schema": round(guided, 1)},
        "loss_percent": round(100 * (1 - guided / plain), 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        path = Path(args.out) / "bench" / "guided.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Throughput of a batch mixing LoRA adapters against the same batch on the base model.

`python -m bench.lora_bench [--out docs]` runs the bundled model offline (the engine, no HTTP).
Four rank-8 adapters on q/k/v/o and the MLP projections are made with PEFT at bench time (seeded,
non-zero B, so every adapter changes the output; nothing is downloaded) and registered at start
like `--lora name=path`. One batch of 16 chat prompts generating 128 tokens each runs three times
on the base model and three times spread over the four adapters (4 requests each), interleaved in
one engine, and the median tokens/s of each is reported with the ratio (target: >= 80%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from bench.run import gguf_path
from llmos_worker.engine import EngineConfig, LLMEngine, SamplingParams

BATCH, TOKENS, REPEATS, ADAPTERS, RANK = 16, 128, 3, 4, 8
TARGET = 0.80
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapters(gguf: Path, out: Path) -> dict[str, str]:
    """Save ADAPTERS seeded random PEFT adapters of the bundled model under `out`; name -> path."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    paths: dict[str, str] = {}
    for i in range(ADAPTERS):
        config = LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=list(MODULES), lora_dropout=0.0
        )
        model: Any = get_peft_model(base, config)
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                # why: PEFT initialises B to zero, which would make the adapter a no-op
                if "lora_A" in name or "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        path = out / f"tuned-{i}"
        with warnings.catch_warnings():
            # why: PEFT looks for the base model's config.json; a GGUF base has none
            warnings.filterwarnings("ignore", "Could not find a config file", UserWarning)
            model.save_pretrained(str(path))
        base = model.unload()
        paths[f"tuned-{i}"] = str(path)
    return paths


def run(engine: LLMEngine, prompts: list[list[int]], names: list[str | None]) -> tuple[float, int]:
    params = [
        SamplingParams(
            max_tokens=TOKENS,
            min_tokens=TOKENS,
            temperature=0.7,
            seed=1,
            ignore_eos=True,
            lora_name=name,
        )
        for name in names
    ]
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="write lora.json under OUT/bench")
    args = parser.parse_args()
    gguf = gguf_path()
    # why kept for the whole run: an adapter evicted from host memory is re-read from its path
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        modules = make_adapters(gguf, Path(tmp))
        engine = LLMEngine.from_source(
            str(gguf),
            EngineConfig(
                max_num_seqs=BATCH,
                max_model_len=1024,
                max_loras=ADAPTERS,
                max_lora_rank=RANK,
                lora_modules=modules,
            ),
        )
        result = measure(engine, sorted(modules))
    print(f"{'batch':<18}{'tokens/s (median of 3)':>24}")
    for k, v in result["median_tokens_per_s"].items():
        print(f"{k:<18}{v:>24}")
    print(f"ratio {result['ratio']:.3f} (target >= {TARGET})")
    print(json.dumps(result, indent=2))
    if args.out:
        path = Path(args.out) / "bench" / "lora.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


def measure(engine: LLMEngine, names: list[str]) -> dict[str, Any]:
    """The interleaved repeats: the base batch, then the batch over every adapter."""
    tok = engine.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": f"Tell me a story about place {i}."}])
        for i in range(BATCH)
    ]
    mixes: dict[str, list[str | None]] = {
        "base": [None] * BATCH,
        "lora_4_adapters": [names[i % ADAPTERS] for i in range(BATCH)],
    }
    run(engine, prompts[:4], list(mixes["lora_4_adapters"][:4]))  # warm-up: every adapter slotted
    rates: dict[str, list[float]] = {k: [] for k in mixes}
    counts: dict[str, int] = {}
    for _ in range(REPEATS):
        for name, mix in mixes.items():
            elapsed, tokens = run(engine, prompts, mix)
            rates[name].append(tokens / elapsed)
            counts[name] = tokens
    base, lora = (statistics.median(rates[k]) for k in mixes)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    ratio = lora / base
    result: dict[str, Any] = {
        "commit": commit,
        "load_average": os.getloadavg(),
        "batch": BATCH,
        "tokens_per_request": TOKENS,
        "adapters": ADAPTERS,
        "rank": RANK,
        "modules": list(MODULES),
        "tokens": counts,
        "tokens_per_s": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        "median_tokens_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
        "ratio": round(ratio, 3),
        "target": TARGET,
        "meets_target": ratio >= TARGET,
    }
    return result


if __name__ == "__main__":
    main()

"""Baseline: Hugging Face `transformers` `generate` on the same GGUF, fp32, static batches.

Requests are taken in workload order in static batches of 1, 8 or 32, left-padded; each batch
generates greedily until its longest request's `max_tokens` (EOS ignored via `min_new_tokens`),
which is what static batching costs. Only each request's own `max_tokens` count as output
tokens. A time budget per batch size bounds the run: batches start only while it lasts, and the
covered fraction of the workload is reported with the throughput.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench.workload import BenchRequest

BATCH_SIZES = (1, 8, 32)


def load(gguf_path: Path) -> tuple[Any, Any]:
    """The transformers model (fp32, eval) and tokenizer for a GGUF file (about 30 s)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    model.eval()
    return model, tok


def _generate(model: Any, pad_id: int, batch: list[BenchRequest]) -> None:
    import torch

    width = max(r.prompt_len for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):  # left padding: prompts end at the same column
        ids[i, width - r.prompt_len :] = torch.tensor(r.prompt_token_ids)
        mask[i, width - r.prompt_len :] = 1
    new = max(r.max_tokens for r in batch)
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad_id,
        )


def run(
    model: Any, tok: Any, requests: list[BenchRequest], batch_size: int, budget_s: float
) -> dict[str, Any]:
    """Throughput of static batches of `batch_size` over as much of the workload as fits."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    _generate(model, pad_id, [BenchRequest("warmup", requests[0].prompt_token_ids[:16], 2)])
    start = time.perf_counter()
    done: list[BenchRequest] = []
    for i in range(0, len(requests), batch_size):
        if done and time.perf_counter() - start > budget_s:
            break
        batch = requests[i : i + batch_size]
        _generate(model, pad_id, batch)
        done.extend(batch)
    elapsed = time.perf_counter() - start
    out_tokens = sum(r.max_tokens for r in done)
    return {
        "batch_size": batch_size,
        "requests_done": len(done),
        "requests_total": len(requests),
        "output_tokens": out_tokens,
        "duration_s": elapsed,
        "output_throughput": out_tokens / elapsed if elapsed > 0 else 0.0,
    }


def best(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The batch size with the highest output throughput."""
    return max(results, key=lambda r: r["output_throughput"], default=None)


def load_tokenizer(gguf_path: Path) -> Any:
    """Only the tokenizer of a GGUF file (for generating workloads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

"""A LoRA adapter on the bundled SmolLM2-135M-Instruct: greedy output equals PEFT + transformers.

The adapter (rank 8 on every projection, seeded random A and B) is made with PEFT on
transformers' fp32 load of the same GGUF and saved with `save_pretrained`; the worker loads the
GGUF and the adapter's files and must give the same tokens for a batch of chat prompts run
together with base-model requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmos_worker.engine import EngineConfig, LLMEngine, SamplingParams
from llmos_worker.model import load_model
from tests.worker.lora_util import hf_greedy, make_adapter

pytestmark = pytest.mark.slow

NEW_TOKENS = 24
QUESTIONS = [
    "What is a Kubernetes pod?",
    "Write a haiku about autumn.",
    "Why is the sky blue?",
    "Name three prime numbers greater than 50.",
]


def test_adapter_on_bundled_model_equals_peft(smollm2_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded: Any = load_model(str(smollm2_gguf), dtype="float32")
    prompts = [
        loaded.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS
    ]
    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    hf.eval()  # type: ignore[no-untyped-call]
    base = hf_greedy(hf, prompts, NEW_TOKENS)
    peft_model = make_adapter(hf, tmp_path / "adapter", seed=7, r=8, alpha=16, std=0.02)
    expect = hf_greedy(peft_model, prompts, NEW_TOKENS)
    assert expect != base

    engine = LLMEngine(
        loaded,
        EngineConfig(
            kv_cache_memory_bytes=64 * 2**20,
            max_lora_rank=8,
            lora_modules={"tuned": str(tmp_path / "adapter")},
        ),
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"a{i}", prompt, params, lora_name="tuned")
        engine.add_request(f"b{i}", prompt, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert [done[f"a{i}"] for i in range(len(prompts))] == expect
    assert [done[f"b{i}"] for i in range(len(prompts))] == base

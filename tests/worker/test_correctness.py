"""Greedy output of the bundled SmolLM2-135M-Instruct equals Hugging Face transformers, token for
token: 16 varied chat prompts x 32 new tokens as ONE concurrent batch of mixed lengths with prefix
caching on (several prompts share a system prompt, so the cache hits), then again with a KV
budget so small that the scheduler must preempt. The reference is HF `generate` on the same GGUF
(fp32, greedy), one unpadded prompt at a time. HF and our engine are each loaded once per module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos_worker.engine import EngineConfig, LLMEngine, SamplingParams
from llmos_worker.model import load_model
from llmos_worker.model.runner import ModelRunner

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
SYSTEM = (
    "You are a careful assistant for a platform team that runs language models on "
    "Kubernetes. Answer briefly, precisely and in plain English; prefer concrete numbers "
    "and commands over general advice."
)
QUESTIONS = [
    "What is a Kubernetes pod?",
    "Explain paged attention in two sentences.",
    "Name three prime numbers greater than 50.",
    "Write a haiku about autumn.",
    "How do I list all namespaces with kubectl?",
    "What does a KV cache store in a transformer?",
    "Translate 'good morning' into French and Spanish.",
    "Give me a short recipe for pancakes.",
]
PLAIN = [
    "Hi!",
    "What is the capital of Japan?",
    "Summarise the plot of Romeo and Juliet in one paragraph, mentioning the families, the "
    "balcony, the secret wedding, the banishment and the ending in the tomb.",
    "Count from one to ten in words.",
    "Why is the sky blue?",
    "List the planets of the solar system in order from the sun, with one fact about each of "
    "them, and say which ones have rings.",
    "2 + 2 = ?",
    "Tell me a joke about computers.",
]


def chat_prompts(tokenizer: Any) -> list[list[int]]:
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        )
        for q in QUESTIONS
    ]
    prompts += [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in PLAIN]
    return prompts


@pytest.fixture(scope="module")
def loaded(smollm2_gguf: Path) -> Any:
    return load_model(str(smollm2_gguf), dtype="float32")


@pytest.fixture(scope="module")
def reference(smollm2_gguf: Path, loaded: Any) -> list[list[int]]:
    """HF greedy continuations, one unpadded prompt at a time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, torch_dtype=torch.float32
    )
    hf.eval()
    outs = []
    with torch.inference_mode():
        for ids in chat_prompts(loaded.tokenizer):
            x = torch.tensor([ids])
            y = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=hf.generation_config.eos_token_id,
            )
            outs.append(y[0, len(ids) :].tolist())
    return outs


def run_engine(loaded: Any, config: EngineConfig) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine(loaded, config)
    prompts = chat_prompts(loaded.tokenizer)
    assert len(prompts) >= 16 and len({len(p) for p in prompts}) > 8  # mixed lengths
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    return [o.outputs[0].token_ids for o in outs], engine


def test_batched_greedy_matches_transformers_with_prefix_cache(
    loaded: Any, reference: list[list[int]]
) -> None:
    # why 256: the batch is admitted over a few steps, so later prompts find the system
    # prompt's blocks published by earlier ones (admitted all in one step, all would miss)
    got, engine = run_engine(
        loaded, EngineConfig(kv_cache_memory_bytes=256 * 2**20, max_num_batched_tokens=256)
    )
    stats = engine.stats()
    assert stats.prefix_cache_hits > 0, stats  # the shared system prompt was reused
    for i, (ours, ref) in enumerate(zip(got, reference, strict=True)):
        assert ours == ref, f"prompt {i}: ours {ours} != transformers {ref}"
    assert stats.num_free_blocks == stats.num_total_blocks


def test_batched_greedy_matches_transformers_under_preemption(
    loaded: Any, reference: list[list[int]]
) -> None:
    per_block = ModelRunner.bytes_per_block(loaded.config, 16, "float32")
    # 20 blocks = 320 token slots for 16 sequences of 30-110 tokens: preemption is forced
    config = EngineConfig(
        kv_cache_memory_bytes=20 * per_block, max_model_len=320, max_num_batched_tokens=256
    )
    got, engine = run_engine(loaded, config)
    stats = engine.stats()
    assert stats.num_preemptions > 0, stats
    for i, (ours, ref) in enumerate(zip(got, reference, strict=True)):
        assert ours == ref, f"prompt {i}: ours {ours} != transformers {ref}"
    assert stats.num_free_blocks == stats.num_total_blocks

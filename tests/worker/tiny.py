"""Test helpers: a tiny random Llama written as a HF directory, and a hand-driven paged batch.

`write_tiny_llama` saves a 2-layer GQA Llama (random weights, fixed seed) with the real SmolLM2
tokenizer and chat template, so engine and server tests get a model that loads in well under a
second yet tokenizes like the real one. `PagedBatcher` is a minimal stand-in for the engine's
block manager + scheduler: it hands out shuffled physical blocks and builds `ForwardBatch`es for
chosen chunks of chosen sequences, so model tests can drive prefill / chunked prefill / decode.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmos_worker.model import ForwardBatch

TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 49152,  # the SmolLM2 tokenizer's
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: 2 query heads per K/V head
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,  # why: larger than default so logits are far from uniform
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_tiny_llama(out_dir: Path, tokenizer_hf: Any, *, seed: int = 0, **overrides: Any) -> Path:
    """Write config.json + model.safetensors + tokenizer files of a random tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **overrides}))
    model.save_pretrained(out_dir)
    tokenizer_hf.save_pretrained(out_dir)
    return out_dir


@dataclass
class _Seq:
    tokens: list[int]
    computed: int = 0
    blocks: list[int] = field(default_factory=list)


class PagedBatcher:
    """Builds ForwardBatches over a KV cache of `num_blocks` blocks, blocks handed out shuffled."""

    def __init__(self, block_size: int, num_blocks: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.seqs: dict[str, _Seq] = {}

    def add(self, seq_id: str, tokens: list[int]) -> None:
        self.seqs[seq_id] = _Seq(list(tokens))

    def append(self, seq_id: str, token: int) -> None:
        self.seqs[seq_id].tokens.append(token)

    def batch(self, chunks: dict[str, int], *, all_logits: bool = False) -> ForwardBatch:
        """Schedule `n` not-yet-computed tokens of each listed sequence (in dict order).

        Logits rows: the last scheduled token of each sequence, or every token if `all_logits`.
        """
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        starts = [0]
        ctx: list[int] = []
        tables: list[list[int]] = []
        logits: list[int] = []
        for seq_id, n in chunks.items():
            seq = self.seqs[seq_id]
            lo, hi = seq.computed, seq.computed + n
            assert hi <= len(seq.tokens), "chunk past the known tokens"
            while len(seq.blocks) * self.block_size < hi:
                seq.blocks.append(self.free.pop())
            for p in range(lo, hi):
                ids.append(seq.tokens[p])
                pos.append(p)
                slots.append(
                    seq.blocks[p // self.block_size] * self.block_size + p % self.block_size
                )
            first = len(ids) - n
            logits.extend(range(first, len(ids)) if all_logits else [len(ids) - 1])
            starts.append(len(ids))
            ctx.append(hi)
            tables.append(list(seq.blocks))
            seq.computed = hi
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]

        def i64(x: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64)

        return ForwardBatch(
            i64(ids), i64(pos), i64(slots), i64(starts), i64(ctx), i64(padded), i64(logits)
        )

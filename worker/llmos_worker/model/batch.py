"""The flat batch one model forward consumes: all scheduled tokens of all sequences, concatenated.

This is the contract between the scheduler side (which owns block tables) and the model runner
(which owns the KV cache tensors). Prefill chunks and single-token decodes mix freely, and so do
requests of different LoRA adapters and of the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # (T,) int64: tokens computed this step, sequence after sequence
    positions: torch.Tensor  # (T,) int64: position of each token within its sequence
    slot_mapping: torch.Tensor  # (T,) int64: KV slot written = block_id * block_size + offset
    query_start_loc: torch.Tensor  # (S+1,) int64: token offsets of each sequence in input_ids
    context_lens: torch.Tensor  # (S,) int64: KV length of each sequence after this step
    block_tables: torch.Tensor  # (S, max_blocks) int64: physical blocks, padded with 0
    logits_indices: torch.Tensor  # (L,) int64: rows of input_ids whose next-token logits are needed
    # (T,) int64 on the CPU: each token's LoRA slot, -1 for the base model; None: no adapter at
    # all. Rows of one slot should be adjacent (one low-rank product per run of a slot)
    lora_slots: torch.Tensor | None = None
    # (P,) int64 or None: rows whose final hidden state (after the last norm) is wanted as well,
    # for embeddings; `LlamaModel.forward_hidden` returns them after the logits
    pool_indices: torch.Tensor | None = None

"""Perplexity of a loaded model on a token stream: the quality check for quantised modes.

The stream is cut into consecutive windows of `window` tokens; each window is one prefill
through the paged forward (the same code path serving uses), and every token after the first of
a window is scored against the logits of the token before it. Perplexity is exp(mean NLL).
"""

from __future__ import annotations

import math

import torch

from llmos_worker.model.batch import ForwardBatch
from llmos_worker.model.loader import LoadedModel
from llmos_worker.model.runner import ModelRunner


def perplexity(loaded: LoadedModel, token_ids: list[int], *, window: int = 256) -> float:
    """exp(mean negative log-likelihood) over `token_ids`, scored in windows of `window`."""
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    block_size = 16
    num_blocks = -(-window // block_size)
    runner = ModelRunner(loaded, block_size=block_size, num_blocks=num_blocks)
    blocks = torch.arange(num_blocks, dtype=torch.long)
    nll, scored = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start : start + window]
        if len(chunk) < 2:
            break
        n = len(chunk)
        batch = ForwardBatch(
            input_ids=torch.tensor(chunk, dtype=torch.long),
            positions=torch.arange(n, dtype=torch.long),
            slot_mapping=torch.arange(n, dtype=torch.long),  # blocks 0.. in order
            query_start_loc=torch.tensor([0, n], dtype=torch.long),
            context_lens=torch.tensor([n], dtype=torch.long),
            block_tables=blocks[None, :],
            logits_indices=torch.arange(n - 1, dtype=torch.long),
        )
        logprobs = torch.log_softmax(runner.execute(batch), dim=-1)  # (n - 1, vocab)
        targets = torch.tensor(chunk[1:], dtype=torch.long)
        nll -= float(logprobs.gather(1, targets[:, None]).sum())
        scored += n - 1
    return math.exp(nll / scored)

"""Copy-on-write support: copy whole KV blocks inside the runner's paged cache.

The block manager decides *which* blocks to copy (a forked sequence about to write into a shared,
partially filled block gets a private copy); this module does the copy. A runner offering
`copy_blocks(pairs)` does it itself; otherwise the copy is done here on the runner's single cache
tensor `kv_cache`, laid out (layers, K/V, num_blocks, block_size, kv_heads, head_dim) as
`ModelRunner` documents: all sources are gathered at once, then scattered onto the destinations.
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK_AXIS = 2  # of ModelRunner.kv_cache: (layers, 2, num_blocks, block_size, Hkv, D)


def copy_kv_blocks(runner: Any, pairs: list[tuple[int, int]]) -> None:
    """Copy KV block `src` onto block `dst` for every `(src, dst)` in `pairs`, in every layer."""
    if not pairs:
        return
    copy = getattr(runner, "copy_blocks", None)
    if callable(copy):
        copy(pairs)
        return
    cache = getattr(runner, "kv_cache", None)
    if not isinstance(cache, torch.Tensor) or cache.dim() <= BLOCK_AXIS:
        raise TypeError("runner exposes neither copy_blocks() nor a kv_cache tensor")
    src = torch.tensor([s for s, _ in pairs], device=cache.device)
    dst = torch.tensor([d for _, d in pairs], device=cache.device)
    with torch.inference_mode():
        cache.index_copy_(BLOCK_AXIS, dst, cache.index_select(BLOCK_AXIS, src))

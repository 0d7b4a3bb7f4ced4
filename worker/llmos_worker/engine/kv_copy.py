"""Copy-on-write support: copy whole KV blocks inside the runner's paged cache.

The block manager decides *which* blocks to copy (a forked sequence about to write into a shared,
partially filled block gets a private copy); this module does the copy. A runner offering
`copy_blocks(pairs)` does it itself; otherwise the copy is done here on the runner's cache
tensors (`kv_caches`: one tensor per layer, or `kv_cache`: one tensor), whose block axis is the
one of length `num_blocks` — indexing that axis with all sources at once, then all destinations.
"""

from __future__ import annotations

from typing import Any

import torch


def _block_axis(cache: torch.Tensor, num_blocks: int) -> int:
    for axis, size in enumerate(cache.shape):
        if size == num_blocks:
            return axis
    raise ValueError(f"no axis of length num_blocks={num_blocks} in KV cache {tuple(cache.shape)}")


def copy_kv_blocks(runner: Any, pairs: list[tuple[int, int]]) -> None:
    """Copy KV block `src` onto block `dst` for every `(src, dst)` in `pairs`, in every layer."""
    if not pairs:
        return
    copy = getattr(runner, "copy_blocks", None)
    if callable(copy):
        copy(pairs)
        return
    caches = getattr(runner, "kv_caches", None)
    if caches is None:
        single = getattr(runner, "kv_cache", None)
        if single is None:
            raise TypeError("runner exposes neither copy_blocks() nor kv_caches/kv_cache")
        caches = [single]
    num_blocks = int(runner.num_blocks)
    with torch.inference_mode():
        for cache in caches:
            axis = _block_axis(cache, num_blocks)
            src = torch.tensor([s for s, _ in pairs], device=cache.device)
            dst = torch.tensor([d for _, d in pairs], device=cache.device)
            cache.index_copy_(axis, dst, cache.index_select(axis, src))

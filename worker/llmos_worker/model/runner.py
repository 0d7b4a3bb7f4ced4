"""ModelRunner: owns the paged KV cache and runs one batched forward per engine step.

The cache is allocated once, zeroed (so padded reads are finite), as one tensor
(layers, 2, num_blocks, block_size, kv_heads, head_dim) in the model dtype (or an opt-in
`kv_dtype`: float16 halves its bytes) on the model's device. On the CPU a cache of 1 MiB or more
is an anonymous memory mapping, which the kernel hands out zero-filled page by page on first
write: the process's resident memory grows with the blocks actually used, not with the budget
(a 4 GiB cache costs nothing until requests fill it);
the engine's block manager hands out block ids into it. `execute` returns float32 logits on CPU
for exactly the rows the scheduler asked for.
"""

from __future__ import annotations

import math
import mmap

import torch

from llmos_worker.errors import ModelLoadError
from llmos_worker.model.batch import ForwardBatch
from llmos_worker.model.config import ModelConfig
from llmos_worker.model.loader import DTYPES, LoadedModel


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


LAZY_MIN_BYTES = 1 << 20


def zeroed(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, mmap.mmap | None]:
    """A zero tensor; on the CPU from `LAZY_MIN_BYTES` up, backed by an anonymous mapping whose
    pages are committed on first write (returned too: it must outlive the tensor)."""
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = elem * math.prod(shape)
    if torch.device(device).type != "cpu" or nbytes < LAZY_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device), None
    mapping = mmap.mmap(-1, nbytes)  # POSIX: anonymous mappings read as zeros
    return torch.frombuffer(mapping, dtype=dtype).view(shape), mapping


class ModelRunner:
    """Runs `LoadedModel.model` over `ForwardBatch`es against a KV cache of `num_blocks` blocks."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        block_size: int,
        num_blocks: int,
        kv_dtype: str | torch.dtype | None = None,
    ) -> None:
        if block_size < 1 or num_blocks < 1:
            raise ModelLoadError(
                f"block_size ({block_size}) and num_blocks ({num_blocks}) must be positive"
            )
        cfg = loaded.config
        self.kv_dtype = loaded.dtype if kv_dtype is None else _torch_dtype(kv_dtype)
        self.loaded = loaded
        self.model = loaded.model
        self.block_size = block_size
        self.num_blocks = num_blocks
        # (layers, K/V, blocks, block_size, Hkv, D)
        shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self._kv_mapping: mmap.mmap | None = None
        self.kv_cache, self._kv_mapping = zeroed(shape, self.kv_dtype, loaded.device)
        self.layer_caches = list(self.kv_cache.unbind(0))

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: str | torch.dtype) -> int:
        """KV bytes one block takes across all layers (K and V)."""
        elem = torch.empty((), dtype=_torch_dtype(dtype)).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """(len(batch.logits_indices), vocab) float32 logits on CPU."""
        with torch.inference_mode():
            logits: torch.Tensor = self.model(batch, self.layer_caches, self.block_size)
        return logits.float().cpu()

    def execute_hidden(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`execute`'s logits and the final hidden states of `batch.pool_indices` (float32,
        CPU; None without pool rows)."""
        with torch.inference_mode():
            logits, hidden = self.model.forward_hidden(batch, self.layer_caches, self.block_size)
        return logits.float().cpu(), None if hidden is None else hidden.float().cpu()

"""This machine's limits, measured in the same run: matmul GFLOP/s, memory bandwidth, and the
tokens/s they allow for the model.

Decoding one token costs about 2 × params FLOPs (one multiply-add per weight; attention over
the context is extra and ignored here, so the roofline is slightly optimistic). At batch 1 every
weight is read once per token, so the memory-bound ceiling is bandwidth / weight bytes. Every
benchmark result is also reported as a fraction of the compute roofline.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class ModelSize:
    """Parameter count and stored size of a GGUF model (tied embeddings counted once)."""

    params: int
    file_weight_bytes: int  # bytes of the tensor data as stored (quantised) in the GGUF

    @property
    def flops_per_token(self) -> int:
        return 2 * self.params


def gguf_model_size(path: Path) -> ModelSize:
    """Read tensor shapes from the GGUF header; no weights are dequantised."""
    from gguf import GGUFReader  # why: the worker's dependency, imported only here

    reader = GGUFReader(str(path))
    params = sum(int(t.n_elements) for t in reader.tensors)
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    return ModelSize(params=params, file_weight_bytes=nbytes)


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float | None:
    """Best sustained GFLOP/s of an n×n @ n×n matmul in `dtype`; None if unsupported."""
    import torch  # why: imported late so that the OpenMP settings of `bench.run` apply

    try:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        c = torch.empty(n, n, dtype=dtype)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)  # warm-up (packing, thread pool start)
        first = time.perf_counter() - t0
    except (RuntimeError, TypeError):
        return None
    if first > seconds:  # why: a dtype without hardware support (bf16 on AVX2) is very slow
        return 2.0 * n**3 / first / 1e9
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        dt = time.perf_counter() - t0
        best = max(best, 2.0 * n**3 / dt / 1e9)
    return best


def memory_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best read bandwidth in GB/s: a sum over a buffer far larger than the caches."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    float(x.sum())  # warm-up: pages touched
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(x.sum())
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def measure(model: ModelSize, *, seconds: float = 1.0) -> dict[str, Any]:
    """Machine numbers plus the model's tokens/s ceilings derived from them."""
    import torch

    fp32 = matmul_gflops(torch.float32, seconds=seconds)
    bf16 = matmul_gflops(torch.bfloat16, seconds=seconds)
    bw = memory_bandwidth_gbs()
    fp32_bytes = 4 * model.params
    return {
        "threads": torch.get_num_threads(),
        "matmul_gflops_fp32": fp32,
        "matmul_gflops_bf16": bf16,
        "memory_read_gbs": bw,
        "model": asdict(model) | {"flops_per_token": model.flops_per_token},
        # compute ceiling: every token costs 2 × params FLOPs
        "compute_tok_s_fp32": (fp32 or 0.0) * 1e9 / model.flops_per_token,
        "compute_tok_s_bf16": (bf16 or 0.0) * 1e9 / model.flops_per_token,
        # batch-1 decode ceiling: all weights read once per token
        "batch1_mem_tok_s_fp32": bw * 1e9 / fp32_bytes,
        "batch1_mem_tok_s_gguf": bw * 1e9 / model.file_weight_bytes,
    }


def fraction(tok_s: float | None, ceiling: float | None) -> float | None:
    """A throughput as a fraction of a ceiling (None when either is unknown)."""
    if tok_s is None or not ceiling:
        return None
    return tok_s / ceiling

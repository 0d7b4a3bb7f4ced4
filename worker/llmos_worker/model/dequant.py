"""Vectorised torch dequantisation of common GGUF block types (F32, F16, BF16, Q8_0, Q4_0, Q4_1).

`gguf.quants.dequantize` (numpy, row group by row group) takes several seconds for a 135M model;
these block formats reduce to a few whole-tensor torch ops. Other formats fall back to the gguf
package. Input: the raw bytes as a (rows, row_bytes) uint8 tensor; output: (rows, cols) float32.
"""

from __future__ import annotations

import torch

# ggml type ids (gguf.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
FAST_TYPES = frozenset({F32, F16, Q4_0, Q4_1, Q8_0, BF16})
_QK = 32  # elements per block of the Q4/Q8 formats


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """(rows, nb, 1) float32 from the 2 little-endian bytes at `start` of each block."""
    return blocks[..., start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(rows, nb, 16) packed bytes -> (rows, nb, 32): low nibbles are elements 0..15."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()


def dequantize_fast(raw: torch.Tensor, ggml_type: int, cols: int) -> torch.Tensor:
    """(rows, row_bytes) uint8 -> (rows, cols) float32 for a type in FAST_TYPES."""
    rows = raw.shape[0]
    if ggml_type == F32:
        return raw.view(torch.float32).clone()
    if ggml_type == F16:
        return raw.view(torch.float16).float()
    if ggml_type == BF16:
        return raw.view(torch.bfloat16).float()
    if ggml_type == Q8_0:  # block: f16 d, 32 x int8 q; x = d * q
        b = raw.view(rows, -1, 34)
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (_f16(b, 0) * q).view(rows, cols)
    if ggml_type == Q4_0:  # block: f16 d, 16 bytes of nibbles; x = d * (q - 8)
        b = raw.view(rows, -1, 18)
        return (_f16(b, 0) * (_nibbles(b[..., 2:]) - 8.0)).view(rows, cols)
    if ggml_type == Q4_1:  # block: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m
        b = raw.view(rows, -1, 20)
        return (_f16(b, 0) * _nibbles(b[..., 4:]) + _f16(b, 2)).view(rows, cols)
    raise ValueError(f"ggml type {ggml_type} has no fast path")

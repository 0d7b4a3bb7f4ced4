"""Rotary position embeddings: inverse frequencies (linear / llama3 scaling) and cos/sin tables.

Tables are computed once per model in float32, for every position up to the context length, and
indexed by `ForwardBatch.positions` at each step. Layout is Hugging Face's "rotate half": the
first and second halves of each head dimension form the rotated pairs.
"""

from __future__ import annotations

import math

import torch

from llmos_worker.model.config import ModelConfig


def inverse_frequencies(config: ModelConfig, factors: torch.Tensor | None = None) -> torch.Tensor:
    """(D/2,) float32 inverse frequencies after the model's RoPE scaling."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling
    if factors is not None:  # GGUF `rope_freqs.weight`: per-frequency divisors, already scaled
        inv = inv / factors.to(torch.float64)
    elif scaling is not None and scaling.rope_type == "linear":
        inv = inv / scaling.factor
    elif scaling is not None and scaling.rope_type == "llama3":
        old_ctx = scaling.original_max_position_embeddings
        low_wavelen = old_ctx / scaling.low_freq_factor
        high_wavelen = old_ctx / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv.to(torch.float32)


def cos_sin_table(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_positions, D) float32 cos and sin, each half repeated (rotate-half layout)."""
    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (P, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D); cos/sin (T, 1, D) in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin

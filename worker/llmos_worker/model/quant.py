"""Opt-in weight quantisation of the decoder's linear layers, on the CPU through fbgemm.

Modes (`QUANTIZATIONS`):
- "none": fp32 weights, `F.linear` (the default, bit-comparable with Hugging Face).
- "fp16": weights stored in fp16 and packed once for fbgemm; activations and accumulation stay
  fp32. Half the weight bytes; results within fp16 rounding of the weights.
- "int8": per-output-channel symmetric int8 weights, Q(w) = round(w / S_c) with
  S_c = max|w_c| / 127 (zero point 0), packed once for fbgemm. Activations are quantised on the fly
  to 8 bits per call (one scale for the whole input, taken from its range), multiplied in int8
  with int32 accumulation and rescaled to fp32. A quarter of the weight bytes and the fastest
  matmuls on AVX2 CPUs; results depend slightly on which rows share a call (the activation scale).

Only the projections inside decoder layers and the LM head are quantised; the embedding lookup,
norms, attention and the KV cache stay in the model dtype. Quantised modes need dtype float32 on
a CPU: fbgemm kernels exist only there. Quality is checked by perplexity against fp32
(tests/worker/test_quantization.py states the bounds).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from llmos_worker.errors import ModelLoadError

Quantization = Literal["none", "fp16", "int8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)


class Linear:
    """y = x @ W.T, with W either a plain tensor or a fbgemm-packed weight."""

    mode: str = "none"

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Fp16Linear(Linear):
    mode = "fp16"

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, in_features = weight.shape
        self._bytes = self.out_features * in_features * 2
        self.packed: Any = torch.ops.quantized.linear_prepack_fp16(weight.float(), None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)  # type: ignore[no-any-return]

    @property
    def nbytes(self) -> int:
        return self._bytes


class Int8Linear(Linear):
    mode = "int8"

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.float()
        self.out_features, in_features = w.shape
        self._bytes = self.out_features * (in_features + 8)  # int8 rows + a scale and zero point
        # (N,) per-output-channel scale; an all-zero row keeps scale 1 (round(0 / 1) = 0)
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # why: torch 2.13 marks quantized tensor constructors deprecated; the version is
            # pinned, and fbgemm's prepack takes nothing else
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(w, scale.double(), zero_points, 0, torch.qint8)
        self.packed: Any = torch.ops.quantized.linear_prepack(qweight, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # why reduce_range: without VNNI, fbgemm multiplies u8 x s8 pairs with a saturating
        # 16-bit add; 7-bit activations keep that from overflowing
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)  # type: ignore[no-any-return]

    @property
    def nbytes(self) -> int:
        return self._bytes


def make_linear(weight: torch.Tensor, mode: str) -> Linear:
    """A `Linear` holding `weight` (N, K) in `mode`; the fp32 tensor is not kept by packed modes."""
    if mode == "none":
        return Linear(weight)
    if mode == "fp16":
        return Fp16Linear(weight)
    if mode == "int8":
        return Int8Linear(weight)
    raise ModelLoadError(f"unknown quantization {mode!r}; use one of {list(QUANTIZATIONS)}")


def check_supported(mode: str, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a quantisation the kernels cannot run, with a message naming the setting."""
    if mode not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {mode!r}; use one of {list(QUANTIZATIONS)}")
    if mode == "none":
        return
    if device.type != "cpu":
        raise ModelLoadError(
            f"quantization {mode!r} runs on the CPU only (fbgemm); use quantization 'none' on "
            f"{device.type}"
        )
    if dtype != torch.float32:
        raise ModelLoadError(f"quantization {mode!r} needs dtype float32, not {dtype}")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ModelLoadError(f"quantization {mode!r} needs fbgemm, which this torch build lacks")

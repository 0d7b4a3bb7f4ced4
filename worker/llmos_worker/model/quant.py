"""Linear layers of the decoder in their weight storage modes, and opt-in weight quantisation.

Modes (`QUANTIZATIONS`):
- "none": fp32 weights (the default, comparable with Hugging Face within fp32 rounding).
- "fp16": weights stored in IEEE half; activations and accumulation stay fp32. Half the bytes
  to read per step. Perplexity within 0.01 % of fp32 (tests/worker/test_quantization.py).
- "int8": int8 weights, symmetric per output channel: W ~ S * Q with
  Q = clamp(round(W / S), -127, 127), S = max|W_row| / 127 (zero point Z = 0). A quarter of the
  bytes. Activations are not clipped: below 12 rows they stay fp32; from 12 rows the native
  kernel rounds each row to 16 bits with its own scale (max|x_row| / 32767) and multiplies in
  integers, 1.15-1.6x faster than fp32 products on this CPU (the rounding is ~250x finer than
  the weights'). Perplexity of SmolLM2-135M within ±0.6 % of fp32 on the test texts (-0.52 %
  and +0.20 %, the same as with fp32 activations).
- "bf16": weights stored in bfloat16 (rounded to nearest even; half the bytes, fp32's exponent
  range). Where the CPU has AVX512_BF16, steps of 8+ rows also round each activation to bf16
  (relative error <= 2^-9) and the native kernel multiplies pairs with vdpbf16ps, accumulating
  in fp32: twice the multiply-adds per instruction of fp32 FMAs; where the CPU also has
  AMX-BF16 (and K is a multiple of 32), the same products run on AMX tiles (tdpbf16ps, fp32
  sums): on a 2-core Xeon, 512 prompt tokens in 216 ms instead of 690. Below 8 rows, or without
  AVX512_BF16, the weights are widened and multiply fp32 activations. Perplexity within 1 % of
  fp32 (tests/worker/test_quantization.py; measured +0.03 % with bf16-rounded activations).
- "int4": 4-bit weights in blocks of 32 along K, each block with an fp16 scale d and minimum m
  (W ~ d * q + m, q in 0..15: GGUF's Q4_1 scheme), 5 bits per weight. Quantising the fp32
  weights of a Q4_1 GGUF finds its blocks again, so the bundled model's decoder layers are
  kept bit for bit, and the mode costs nothing in quality there: the LM head goes into 8-bit
  blocks with an fp16 scale each (GGUF's Q8_0, as such files keep it), which finds the bundled
  file's head again bit for bit too, so perplexity equals fp32's. Up to 95 rows the native
  kernel (512-bit build) turns each block's 4-bit values into floats once for a tile of up to
  4 rows, sums x * q per block in fp32 and applies d and m per block (m times the block's sum of
  x), reading 5 bits per weight (256-bit build: row by row, up to 7 rows); from 96 rows
  (256-bit: 8) it dequantises each panel to fp32 once per pass and multiplies as fp32. A row
  alone, where the CPU has AVX512_VNNI and AVX512_VBMI, multiplies in integers instead: x
  rounded per block of 32 to 16-bit steps, exact int32 sums (cpu_kernels.c, LIN_BLK_VNNI).
  Measured on SmolLM2's shapes (30 layers, 2-core Zen 5): 1.9 ms a step at 1 row, 2.2 at 2,
  2.9 at 4, 8.3 at 16 (int8: 2.7, 4.4, 5.0, 10.4; fp32 at 16 rows: 17.3). Needs every K a
  multiple of 32.

On a CPU with the native kernels every mode's weights are stored packed (panels of 16 output
rows, K-major) and multiplied by the native linear kernel (kernels/cpu_kernels.c) at every row
count: measured with SmolLM2-135M's shapes (all 30 layers, so weights come from memory) on a
2-core AVX2 CPU, fp32 weights run 2x faster than torch's matmul at 1 row, 2.4x at 32 and
0.9-1.5x from 64 to 1024 rows; fp16 and int8 read proportionally fewer bytes (int8 at 1 row:
2.5x fp32). Without the native kernel, fp32 runs through `F.linear`, fp16 through fbgemm's
packed fp16 GEMM, and int8 through torch on the dequantised matrix (correct, but slow).
Where the CPU has AVX-512 the kernel's 512-bit variant takes two panels per tile: on a 2-core
Zen 5, fp32 products at 40 rows ~470 GFLOP/s (256-bit: ~215), from 256 rows ~520-550 (~255;
torch ~220), int8 x 16-bit rows in integers (vpdpwssd) ~860 GOP/s (256-bit vpmaddwd: ~430),
and bf16 x bf16-rounded rows (vdpbf16ps) ~790 at 40 rows and ~940 from 256.

Measured and not offered: fbgemm's dynamic int8 (activations quantised per call too, with one
7-bit scale for the whole input) raises SmolLM2-135M's perplexity from 17.5 to 48.6 (outlier
channels into `down`), and by 12 % even with SmoothQuant-style scaling.

Only the projections inside decoder layers and the LM head are stored this way (int4: the head
in 8-bit blocks); the embedding lookup, norms, attention and the KV cache stay in the model dtype.
Quantised modes need dtype float32 on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn.functional as F

from llmos_worker.errors import ModelLoadError

if TYPE_CHECKING:
    from llmos_worker.model.kernels import NativeKernels

Quantization = Literal["none", "fp16", "int8", "bf16", "int4"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)

PANEL = 16  # output rows per packed panel: LIN_PNR in kernels/cpu_kernels.c
BLOCK = 32  # values of k per block of the block-quantised weights (GGUF's Q4_1, Q8_0)
# bytes per (panel, block) of 4-bit and 8-bit blocks: cpu_kernels.c lin_blk_bytes
Q4_BYTES, Q8_BYTES = 320, 544


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (ceil(N / 16), K, 16): the native kernel's layout, rows past N zero.

    bfloat16 weights go in k pairs instead, (ceil(N / 16), K / 2, 16, 2) with element
    [p, t, j, e] = W[16p + j, 2t + e]: the layout vdpbf16ps and AMX multiply, so the kernel reads
    it in place at every row count (an even K only).
    """
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=weight.dtype, device=weight.device)
    padded[:n] = weight
    if weight.dtype is torch.bfloat16:
        if k % 2:
            raise ValueError(f"bf16 panels hold k in pairs: K must be even, not {k}")
        return padded.view(panels, PANEL, k // 2, 2).transpose(1, 2).contiguous()
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


def unpack_panels(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_panels`: (P, K, 16) or bf16's (P, K / 2, 16, 2) -> (n, K)."""
    panels, k = packed.shape[0], packed.shape[1] * (2 if packed.dim() == 4 else 1)
    return packed.transpose(1, 2).reshape(panels * PANEL, k)[:n].contiguous()


class Linear:
    """y = x @ W.T for W (N, K) held in `mode`'s storage type, dense or packed.

    Packed (`pack`, on a CPU with the native linear kernel), products run in that kernel at every
    row count; dense, through torch. `dense()` is the fp32 matrix either way computes with.
    """

    mode: str = "none"

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.scale: torch.Tensor | None = None
        self.packed = False
        # the kernels and their bound call for the packed weight (checked once, not per call)
        self._bound: tuple[NativeKernels, Callable[[torch.Tensor], torch.Tensor]] | None = None

    def pack(self) -> None:
        if not self.packed:
            self.weight, self.packed, self._bound = pack_panels(self.weight), True, None

    def unpack(self) -> None:
        if self.packed:
            self.weight = unpack_panels(self.weight, self.out_features)
            self.packed, self._bound = False, None

    def dense(self) -> torch.Tensor:
        w = unpack_panels(self.weight, self.out_features) if self.packed else self.weight
        w = w.float()
        return w if self.scale is None else w * self.scale[:, None]

    def __call__(self, x: torch.Tensor, kernels: NativeKernels | None = None) -> torch.Tensor:
        if self.packed and kernels is not None:
            if self._bound is None or self._bound[0] is not kernels:
                self._bound = (
                    kernels,
                    kernels.bind_linear(self.weight, self.out_features, self.scale),
                )
            return self._bound[1](x)
        if not self.packed and self.mode == "none":
            return F.linear(x, self.weight)
        return F.linear(x, self.dense().to(x.dtype))  # a stored type torch cannot multiply

    @property
    def nbytes(self) -> int:
        scale = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return self.weight.numel() * self.weight.element_size() + scale


class Fp16Linear(Linear):
    """W in IEEE half."""

    mode = "fp16"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight.to(torch.float16).contiguous())


class Int8Linear(Linear):
    """Weight-only int8 with a scale per output row: y = (x @ Q.T) * S."""

    mode = "int8"

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.float()
        scale = w.abs().amax(dim=1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays 0
        super().__init__(torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.scale = scale.contiguous()


class Bf16Linear(Linear):
    """W in bfloat16 (round to nearest even)."""

    mode = "bf16"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight.to(torch.bfloat16).contiguous())

    def pack(self) -> None:
        if self.in_features % 2 == 0:  # an odd K has no k-pair panels: it stays on torch
            super().pack()


class Fp16PackedLinear(Linear):
    """fp16 W packed once for fbgemm: the fp16 mode where the native kernel is unavailable."""

    mode = "fp16"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(torch.empty(0, 0))  # no tensor: fbgemm keeps its own copy
        self.out_features, self.in_features = weight.shape
        self.fbgemm: Any = torch.ops.quantized.linear_prepack_fp16(weight.float(), None)
        # why the overload: calling the packet re-checks its arguments in Python on every call
        self._op = torch.ops.quantized.linear_dynamic_fp16.default

    def pack(self) -> None:
        pass  # already in fbgemm's own layout

    def dense(self) -> torch.Tensor:
        weight, _ = torch.ops.quantized.linear_unpack_fp16(self.fbgemm)
        return weight.float()  # type: ignore[no-any-return]

    def __call__(self, x: torch.Tensor, kernels: NativeKernels | None = None) -> torch.Tensor:
        return self._op(x, self.fbgemm)  # type: ignore[no-any-return]

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * 2


def quantize_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) -> q (N, K) uint8 in 0..15, d and m (N, K / 32) fp16: W ~ d * q + m per block.

    As GGUF's Q4_1: per block of 32 values of a row, m = min and d = (max - min) / 15, both
    stored in fp16; q rounds against the stored d and m, so a block that came from Q4_1 (every
    weight d * q + m) is found again exactly.
    """
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // BLOCK, BLOCK)
    lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)
    d, m = ((hi - lo) / 15.0).to(torch.float16), lo.to(torch.float16)
    if not (torch.isfinite(d).all() and torch.isfinite(m).all()):
        raise ModelLoadError("quantization 'int4': weights beyond fp16's range (|w| > 65504)")
    d32, m32 = d.float(), m.float()
    step = torch.where(d32 > 0, d32, torch.ones_like(d32))  # a constant block: q = 0, w = m
    q = torch.round((blocks - m32[..., None]) / step[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(n, k), d, m


def quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> q (N, K) int8 in -127..127 and d (N, K / 32) fp16: W ~ d * q per block.

    As GGUF's Q8_0: per block of 32 values of a row, d = max|w| / 127 stored in fp16, q rounded
    against the stored d, so a block that came from Q8_0 is found again exactly.
    """
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // BLOCK, BLOCK)
    d = (blocks.abs().amax(dim=-1) / 127.0).to(torch.float16)
    if not torch.isfinite(d).all():
        raise ModelLoadError("8-bit blocks: weights beyond fp16's range (|w| > 65504 * 127)")
    d32 = d.float()
    step = torch.where(d32 > 0, d32, torch.ones_like(d32))  # an all-zero block stays 0
    q = torch.round(blocks / step[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(n, k), d


def pack_blocks(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """`quantize_q4`'s (q, d, m) or `quantize_q8`'s (q, d) -> (ceil(N / 16), K / 32, bytes)
    uint8, the native kernel's layout: per panel of 16 rows and block, the rows' d (fp16), then
    (4-bit) their m and for each k pair j one byte per row, q[2j] in its low nibble and
    q[2j + 1] in its high (320 bytes); or (8-bit) for each k one int8 per row (544 bytes).
    Rows past N are zero."""
    n, k = q.shape
    panels, kb = -(-n // PANEL), k // BLOCK
    rows = panels * PANEL
    qp = torch.zeros(rows, k, dtype=q.dtype)
    qp[:n] = q

    def per_block(v: torch.Tensor) -> torch.Tensor:  # (n, kb) fp16 -> (P, kb, 32) bytes
        vp = torch.zeros(rows, kb, dtype=torch.float16)
        vp[:n] = v
        return vp.view(panels, PANEL, kb).transpose(1, 2).contiguous().view(torch.uint8)

    parts: tuple[torch.Tensor, ...]
    if m is None:  # 8-bit: (P, r, b, k) -> (P, b, k, r)
        values = qp.view(panels, PANEL, kb, BLOCK).permute(0, 2, 3, 1).view(torch.uint8)
        parts = (per_block(d), values.reshape(panels, kb, -1))
    else:
        pairs = qp.view(panels, PANEL, kb, BLOCK // 2, 2)  # (P, r, b, j, low/high)
        nibbles = (pairs[..., 0] | (pairs[..., 1] << 4)).permute(0, 2, 3, 1)  # (P, b, j, r)
        parts = (per_block(d), per_block(m), nibbles.reshape(panels, kb, -1))
    return torch.cat(parts, dim=2).contiguous()


def unpack_blocks(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The fp32 (n, K) matrix a `pack_blocks` layout holds: d * q (+ m), computed as GGUF's
    Q4_1 and Q8_0 dequantisation computes it, so such weights come back bit for bit."""
    panels, kb, width = packed.shape
    d = packed[..., :32].contiguous().view(torch.float16).float().transpose(1, 2)  # (P, r, b)
    if width == Q8_BYTES:
        values = packed[..., 32:].contiguous().view(torch.int8).reshape(panels, kb, BLOCK, PANEL)
        q = values.permute(0, 3, 1, 2).float()  # (P, r, b, k)
        w = d[..., None] * q
    else:
        m = packed[..., 32:64].contiguous().view(torch.float16).float().transpose(1, 2)
        nib = packed[..., 64:].reshape(panels, kb, BLOCK // 2, PANEL)  # (P, b, j, r)
        q = torch.stack((nib & 15, nib >> 4), dim=-1).permute(0, 3, 1, 2, 4)  # (P, r, b, j, 2)
        w = d[..., None] * q.reshape(panels, PANEL, kb, BLOCK).float() + m[..., None]
    return w.reshape(panels * PANEL, kb * BLOCK)[:n].contiguous()


class BlockLinear(Linear):
    """Weights in blocks of 32 along K with fp16 scales, as GGUF stores them: `mode` "int4"
    (4-bit values with a minimum per block too, Q4_1) or "q8_0" (8-bit values, Q8_0: int4's LM
    head).

    Held in the native kernel's block layout (`pack_blocks`) either way: `packed` says whether
    the native kernel multiplies it; unpacked, the torch path dequantises it per call (correct,
    but slow).
    """

    def __init__(self, weight: torch.Tensor, mode: str) -> None:
        k = weight.shape[1]
        if k % BLOCK:
            raise ModelLoadError(
                f"quantization 'int4' stores blocks of {BLOCK} along K: in_features must be a "
                f"multiple of {BLOCK}; a projection has {k}"
            )
        super().__init__(weight)
        self.mode = mode
        quantized = quantize_q4(weight) if mode == "int4" else quantize_q8(weight)
        self.weight = pack_blocks(*quantized)

    def pack(self) -> None:
        self.packed = True

    def unpack(self) -> None:
        self.packed, self._bound = False, None

    def dense(self) -> torch.Tensor:
        return unpack_blocks(self.weight, self.out_features)


# modes whose LM head is stored another way (see LlamaModel.quantize): int4's as GGUF files keep
# it, in 8-bit blocks
HEAD_MODES = {"int4": "q8_0"}


def make_linear(weight: torch.Tensor, mode: str, *, native: bool = True) -> Linear:
    """A `Linear` holding `weight` (N, K) in `mode`; the fp32 tensor is not kept by other modes.

    `native`: whether the native linear kernel is available (it decides how fp16 is stored).
    """
    if mode == "none":
        return Linear(weight)
    if mode == "fp16":
        return Fp16Linear(weight) if native else Fp16PackedLinear(weight)
    if mode == "int8":
        return Int8Linear(weight)
    if mode == "bf16":
        return Bf16Linear(weight)
    if mode in ("int4", "q8_0"):  # q8_0: not a mode of its own, int4's LM head
        return BlockLinear(weight, mode)
    raise ModelLoadError(f"unknown quantization {mode!r}; use one of {list(QUANTIZATIONS)}")


def check_supported(
    mode: str, dtype: torch.dtype, device: torch.device, *, native: bool = True
) -> None:
    """Refuse a quantisation the kernels cannot run, with a message naming the setting.

    `native`: whether the native linear kernel is available; the loader checks early with the
    default (before the kernels are built), the model again when it stores its weights.
    """
    if mode not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {mode!r}; use one of {list(QUANTIZATIONS)}")
    if mode == "none":
        return
    if device.type != "cpu":
        raise ModelLoadError(
            f"quantization {mode!r} runs on the CPU only; use quantization 'none' on {device.type}"
        )
    if dtype != torch.float32:
        raise ModelLoadError(f"quantization {mode!r} needs dtype float32, not {dtype}")
    if mode == "fp16" and not native and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ModelLoadError(
            "quantization 'fp16' needs the native kernels or fbgemm; this machine has neither"
        )

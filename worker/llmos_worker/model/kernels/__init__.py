"""Native CPU kernels, compiled from C on first use and cached, with the torch path as fallback.

The kernels (cpu_kernels.c): paged decode and prefill attention reading K/V in place (the
prefill one blocked like flash attention), residual add + RMSNorm, rotary embedding in place,
SiLU(gate) * up, linear layers over packed fp32, fp16, bf16, int8 or block-quantised (4-bit,
8-bit) weights, and all of that for every decoder layer of a decode step in one call
(`DecoderStack`).
`native_kernels()` returns the loaded library or None. It builds `cpu_kernels.c` with the
system C compiler (`$CC`, else `cc`) into a cache directory (`$LLMOS_KERNEL_CACHE`, else
`$XDG_CACHE_HOME/llmos-worker/kernels`, else `~/.cache/llmos-worker/kernels`) under a name that
hashes the source, the flags, the compiler and this CPU (the build uses `-march=native`), so a
cache shared between machines never serves a mismatched binary. The build takes about a second;
concurrent builders each write a temporary file and rename it into place. Without a compiler, or
with `LLMOS_NATIVE_KERNELS=0`, the worker logs why once and runs the pure-torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC")
_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class NativeKernels:
    """The loaded kernel library with typed entry points."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        fn = lib.llmos_paged_decode_attention
        fn.argtypes = [_ptr] * 7 + [_i64] * 9 + [_f32, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._decode = fn
        fn = lib.llmos_paged_prefill_attention
        fn.argtypes = [_ptr] * 8 + [_i64] * 9 + [_f32, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._prefill = fn
        # fp16 K/V caches need F16C; without it such caches take the torch path
        self.has_kv_half = bool(lib.llmos_kv_half_supported())
        self.max_group = int(lib.llmos_max_group())
        self._norm = lib.llmos_add_rms_norm
        self._norm.argtypes = [_ptr] * 4 + [_i64] * 2 + [_f32]
        self._norm.restype = None
        self._rope = lib.llmos_rope
        self._rope.argtypes = [_ptr] + [_i64] * 4 + [_ptr, _i64, _ptr, _ptr]
        self._rope.restype = ctypes.c_int
        self._silu_mul = lib.llmos_silu_mul
        self._silu_mul.argtypes = [_ptr] * 2 + [_i64] * 2
        self._silu_mul.restype = None
        self._linear = lib.llmos_linear
        self._linear.argtypes = [_ptr, _i64, _i64, _i64, _ptr, ctypes.c_int, _ptr, _i64, _ptr]
        self._linear.restype = ctypes.c_int
        # the linear kernel needs AVX2, FMA and F16C; without them callers keep torch's matmul
        self.has_linear = bool(lib.llmos_linear_supported())
        # 512 where the build (-march=native) has AVX-512, else 256 (0: no linear kernel)
        self.vector_bits = int(lib.llmos_linear_vector_bits())
        # from this many rows, int8 weights multiply 16-bit quantised rows of x in integers
        self.int8_integer_rows = int(lib.llmos_linear_int_rows())
        # from this many rows, bf16 weights multiply rows rounded to bf16 (vdpbf16ps); 0 when
        # the build has no AVX512_BF16 (then fp32 rows at every count)
        self.bf16_dot_rows = int(lib.llmos_linear_bf16_rows())
        # those bf16 products run on AMX tiles (K a multiple of 32): the CPU has AMX-BF16 and
        # Linux granted the process the tile state
        self.bf16_amx = bool(lib.llmos_linear_bf16_amx())
        # one row of x multiplies 4- and 8-bit block weights in integers, quantised to 16 bits
        # per block of 32 (AVX512_VNNI and AVX512_VBMI); else in fp32
        self.block_vnni = bool(lib.llmos_linear_block_vnni())
        self._stack = lib.llmos_decoder_stack
        # dims, layer table, weight type, eps, attention scale, cos, sin, x, T, positions,
        # slots, rows, block tables, context lengths, S, max blocks, LoRA descriptor or NULL
        self._stack.argtypes = [_ptr, _ptr, ctypes.c_int, _f32, _f32, _ptr, _ptr, _ptr, _i64]
        self._stack.argtypes += [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _ptr]
        self._stack.restype = ctypes.c_int
        layout = (lib.llmos_stack_dims(), lib.llmos_stack_fields(), lib.llmos_stack_lora_fields())
        if layout != (_STACK_DIMS, _STACK_FIELDS, _STACK_LORA_HEADER * 100 + _STACK_LORA_FIELDS):
            raise RuntimeError("cpu_kernels.c and this module disagree on the stack layout")

    def reads_kv(self, dtype: torch.dtype) -> bool:
        """Whether the attention kernels read K/V caches of `dtype` (fp16 needs F16C)."""
        return dtype is torch.float32 or (dtype is torch.float16 and self.has_kv_half)

    # The per-layer ops take fp32 CPU tensors laid out as the decoder makes them; the shapes
    # are checked (cheap) so a wrong call raises instead of reading out of bounds.

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """x += delta in place (when given); returns rms_norm(x) * weight. x, delta (T, dim)."""
        _check_f32(x, weight, *(() if delta is None else (delta,)))
        if delta is not None and delta.shape != x.shape:
            raise ValueError(f"delta {tuple(delta.shape)} does not match x {tuple(x.shape)}")
        if x.dim() != 2 or weight.shape != (x.shape[1],):
            raise ValueError("x must be (T, dim) and weight (dim,)")
        out = torch.empty_like(x)
        self._norm(
            x.data_ptr(),
            None if delta is None else delta.data_ptr(),
            weight.data_ptr(),
            out.data_ptr(),
            x.shape[0],
            x.shape[1],
            eps,
        )
        return out

    def rope_(
        self,
        x: torch.Tensor,
        heads: int,
        head_dim: int,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> None:
        """Rotate the first `heads` heads of every row of x (T, width) in place.

        cos, sin (P, head_dim) tables; positions (T,) int64 rows of them, each < P.
        """
        _check_f32(x, cos, sin)
        if x.dim() != 2 or heads * head_dim > x.shape[1] or head_dim % 2:
            raise ValueError("x must be (T, width) holding `heads` heads of even head_dim")
        if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim:
            raise ValueError("cos and sin must be (P, head_dim)")
        if positions.dtype != torch.int64 or positions.shape != (x.shape[0],):
            raise ValueError("positions must be (T,) int64")
        positions = positions.contiguous()
        # why the bounds are checked in C: a min()/max() here would be two more torch ops per
        # layer on the hot path
        status = self._rope(
            x.data_ptr(),
            x.shape[0],
            x.shape[1],
            heads,
            head_dim,
            positions.data_ptr(),
            cos.shape[0],
            cos.data_ptr(),
            sin.data_ptr(),
        )
        if status != 0:
            raise ValueError("position outside the RoPE table")

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(T, I) silu(gate) * up of gate_up (T, 2I) = [gate | up]."""
        _check_f32(gate_up)
        if gate_up.dim() != 2 or gate_up.shape[1] % 2:
            raise ValueError("gate_up must be (T, 2 * intermediate)")
        inter = gate_up.shape[1] // 2
        out = torch.empty((gate_up.shape[0], inter), dtype=torch.float32)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.shape[0], inter)
        return out

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        n: int,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(M, n) = x (M, K) @ W.T [* scale], W (n, K) packed by `quant.pack_panels`.

        packed (ceil(n / 16), K, 16) contiguous float32, float16 or int8 (with `scale` (n,)
        fp32, one per output row), (ceil(n / 16), K / 2, 16, 2) bfloat16 in k pairs, or
        (ceil(n / 16), K / 32, 320 | 544) uint8 blocks of 4-bit | 8-bit values
        (`quant.pack_blocks`); x fp32 with unit column stride (rows may be a slice of a wider
        tensor). With int8 weights and at least
        `int8_integer_rows` rows, each row of x is quantised to 16 bits (symmetric, its own
        scale) and multiplied in integers: every input is then within half of 1/32767 of its
        row's largest magnitude. With bf16 weights and at least `bf16_dot_rows` rows (where
        that is not 0), each x value is rounded to bf16 (relative error <= 2^-9) and products
        sum in fp32.
        """
        return self.bind_linear(packed, n, scale)(x)

    def bind_linear(
        self, packed: torch.Tensor, n: int, scale: torch.Tensor | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """`linear` with the weight checked once: returns x -> x @ W.T [* scale].

        Per call only x is checked: a decode step makes a hundred of these calls, and the
        weight's checks would cost more than a small product. The function holds references to
        `packed` and `scale`, so their memory stays valid while it lives.
        """
        if not self.has_linear:
            raise RuntimeError("this build of the native kernels has no linear kernel (no AVX2)")
        self._check_packed(packed, n, scale)
        wtype, k = weight_type(packed), packed_k(packed)
        fn, w_ptr = self._linear, packed.data_ptr()
        s_ptr = None if scale is None else scale.data_ptr()
        f32 = torch.float32

        def call(x: torch.Tensor) -> torch.Tensor:
            _ = packed, scale  # why: keeps both alive as long as the pointers are used
            if x.dtype is not f32 or not x.is_cpu or x.dim() != 2 or x.stride(1) != 1:
                raise ValueError("x must be (M, K) float32 on the CPU with unit column stride")
            if x.shape[1] != k:
                raise ValueError(f"x has {x.shape[1]} columns, the weight {k}")
            m = x.shape[0]
            out = torch.empty((m, n), dtype=f32)
            status = fn(x.data_ptr(), m, k, x.stride(0), w_ptr, wtype, s_ptr, n, out.data_ptr())
            if status != 0:
                raise RuntimeError(f"native linear refused its inputs (status {status})")
            return out

        return call

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        rows: torch.Tensor,
        out: torch.Tensor,
        scale: float,
    ) -> None:
        """Attend one query token per sequence against its paged K/V; writes `out[rows]`.

        q (T, H, D) fp32 with unit strides inside a row; k_cache, v_cache (N, bs, Hkv, D)
        contiguous, fp32 or fp16 (`has_kv_half`); block_tables (S, nb), context_lens (S,),
        rows (S,) contiguous int64; out (T, H, D) contiguous fp32.
        """
        half = _check_attention(q, k_cache, v_cache, out, block_tables, context_lens, rows)
        _, h, d = q.shape
        num_blocks, bs, hkv, _ = k_cache.shape
        status = self._decode(
            q.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            block_tables.data_ptr(),
            context_lens.data_ptr(),
            rows.data_ptr(),
            out.data_ptr(),
            q.stride(0),
            rows.shape[0],
            h,
            hkv,
            d,
            bs,
            block_tables.shape[1],
            num_blocks,
            q.shape[0],
            scale,
            half,
        )
        if status == 5:
            raise ValueError("rows outside q")
        if status != 0:
            raise RuntimeError(f"native paged attention refused its inputs (status {status})")

    def paged_prefill_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        starts: torch.Tensor,
        query_lens: torch.Tensor,
        context_lens: torch.Tensor,
        out: torch.Tensor,
        scale: float,
    ) -> None:
        """Causal attention of prefill chunks against their paged K/V (the chunks' own K/V
        already written); writes their rows of `out`.

        Chunk c is rows starts[c] .. starts[c] + query_lens[c] of q and out, the last
        query_lens[c] of its context_lens[c] positions; token i of it attends to positions
        [0, context_lens[c] - query_lens[c] + i]. Layouts as `paged_decode_attention`'s.
        """
        half = _check_attention(
            q, k_cache, v_cache, out, block_tables, context_lens, starts, query_lens
        )
        _, h, d = q.shape
        num_blocks, bs, hkv, _ = k_cache.shape
        status = self._prefill(
            q.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            block_tables.data_ptr(),
            starts.data_ptr(),
            query_lens.data_ptr(),
            context_lens.data_ptr(),
            out.data_ptr(),
            q.stride(0),
            starts.shape[0],
            h,
            hkv,
            d,
            bs,
            block_tables.shape[1],
            num_blocks,
            q.shape[0],
            scale,
            half,
        )
        if status == 5:
            raise ValueError("chunk rows outside q")
        if status == 2:
            raise ValueError("chunk lengths must satisfy 1 <= query_len <= context_len <= table")
        if status != 0:
            raise RuntimeError(f"native prefill attention refused its inputs (status {status})")

    def bind_stack(self, spec: StackSpec, layers: list[StackLayer]) -> DecoderStack:
        """All of `layers` as one native call per step (see `DecoderStack`); the weights are
        checked here, once."""
        if not self.has_linear:
            raise RuntimeError("this build of the native kernels has no linear kernel (no AVX2)")
        if spec.heads % spec.kv_heads or spec.heads // spec.kv_heads > self.max_group:
            raise ValueError(f"{spec.heads} query heads over {spec.kv_heads} KV heads")
        if spec.head_dim % 2:
            raise ValueError("head_dim must be even")
        _check_f32(spec.cos, spec.sin)
        if spec.cos.shape != spec.sin.shape or spec.cos.shape[1:] != (spec.head_dim,):
            raise ValueError("cos and sin must be (P, head_dim)")
        hd = spec.head_dim
        shapes = {  # (out rows, in features) of each projection
            "qkv": ((spec.heads + 2 * spec.kv_heads) * hd, spec.hidden),
            "o": (spec.hidden, spec.heads * hd),
            "gate_up": (2 * spec.intermediate, spec.hidden),
            "down": (spec.hidden, spec.intermediate),
        }
        wtype = weight_type(layers[0].qkv[0]) if layers else 0
        table = torch.zeros((len(layers), _STACK_FIELDS), dtype=torch.int64)
        for i, layer in enumerate(layers):
            _check_f32(layer.input_norm, layer.post_norm)
            if layer.input_norm.shape != (spec.hidden,) or layer.post_norm.shape != (spec.hidden,):
                raise ValueError(f"layer {i}: norm weights must be ({spec.hidden},)")
            row = [layer.input_norm.data_ptr(), layer.post_norm.data_ptr()]
            for name, (packed, scale) in zip(
                shapes, (layer.qkv, layer.o, layer.gate_up, layer.down), strict=True
            ):
                n, k = shapes[name]
                self._check_packed(packed, n, scale)
                if weight_type(packed) != wtype:
                    raise ValueError(f"layer {i} {name}: weights of mixed types")
                if packed_k(packed) != k:
                    raise ValueError(f"layer {i} {name}: packed {tuple(packed.shape)}, K != {k}")
                row += [packed.data_ptr(), 0 if scale is None else scale.data_ptr()]
            table[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        dims = [spec.hidden, spec.heads, spec.kv_heads, hd, spec.intermediate, len(layers)]
        dims += [1, 0, spec.cos.shape[0], 0]  # block size and count, fp16 K/V: set per cache
        return DecoderStack(self, spec, layers, torch.tensor(dims, dtype=torch.int64), table, wtype)

    def _check_packed(self, packed: torch.Tensor, n: int, scale: torch.Tensor | None) -> None:
        pairs = packed.dtype is torch.bfloat16
        if (
            packed.dtype not in _WEIGHT_TYPES
            or not packed.is_contiguous()
            or packed.dim() != (4 if pairs else 3)
            or (pairs and packed.shape[3] != 2)
        ):
            raise ValueError(
                "weight must be packed (P, K, 16) float32, float16 or int8, (P, K / 2, 16, 2) "
                "bfloat16 k pairs, or (P, K / 32, 320 | 544) uint8 blocks (4-bit | 8-bit)"
            )
        panels, width = packed.shape[0], packed.shape[2]
        blocks = packed.dtype is torch.uint8
        if (width not in _BLOCK_BYTES.values() if blocks else width != 16) or not (
            (panels - 1) * 16 < n <= panels * 16
        ):
            raise ValueError(f"packed weight {tuple(packed.shape)} does not hold {n} rows")
        if blocks and packed_k(packed) > _BLOCK_MAX_K:
            raise ValueError(f"block-quantised weights of K > {_BLOCK_MAX_K} are not supported")
        if not packed.is_cpu:
            raise ValueError("native linear takes CPU tensors")
        if (packed.dtype == torch.int8) != (scale is not None):
            raise ValueError("int8 weights need a scale per output row, other types none")
        if scale is not None:
            _check_f32(scale)
            if scale.shape != (n,):
                raise ValueError(f"scale must be ({n},)")


@dataclass(frozen=True)
class StackSpec:
    """The shapes of a decoder stack and what all its layers share."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float  # RMSNorm epsilon
    attn_scale: float
    cos: torch.Tensor  # (P, head_dim) RoPE tables, fp32
    sin: torch.Tensor


@dataclass(frozen=True)
class StackLayer:
    """One decoder layer's weights: norms (hidden,) and projections packed by
    `quant.pack_panels`, each as (packed, its int8 scale or None)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    gate_up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class StackLoRA:
    """LoRA adapters for one whole-stack call: per layer the (A, Bt) of each projection
    ("qkv", "o", "gate_up", "down"; A (slots, P*R, in), Bt (slots, P*R, out), fp32, contiguous,
    P the projection's parts, R `max_rank`) as a (layers, 8) address table, every slot's rank
    (slots,) and each row's slot (T,) (-1: the base model), all int64. The tensors must live
    as long as the call; the table and ranks may be updated in place between calls."""

    table: torch.Tensor
    ranks: torch.Tensor
    row_slots: torch.Tensor
    max_rank: int

    def descriptor(self, rows: int, layers: int) -> torch.Tensor:
        slots = self.ranks.shape[0]
        for v in (self.table, self.ranks, self.row_slots):
            if v.dtype != torch.int64 or not v.is_contiguous() or not v.is_cpu:
                raise ValueError("LoRA table, ranks and row slots: contiguous CPU int64")
        if self.table.shape != (layers, _STACK_LORA_FIELDS) or self.row_slots.shape != (rows,):
            raise ValueError(f"LoRA table must be ({layers}, 8) and row slots ({rows},)")
        if not 1 <= self.max_rank <= STACK_LORA_MAX_RANK or slots < 1:
            raise ValueError(f"LoRA max rank must be 1..{STACK_LORA_MAX_RANK}, slots >= 1")
        header = [slots, self.max_rank, self.ranks.data_ptr(), self.row_slots.data_ptr()]
        return torch.tensor([*header, self.table.data_ptr()], dtype=torch.int64)


class DecoderStack:
    """Every decoder layer of a step in one native call (`llmos_decoder_stack`).

    For steps whose every row the native paged attention serves (one row per decode, one per
    token of a short chunk over a cached prefix): the residual stream x is updated in place
    through all layers, and each layer's new K/V land in its cache. Holds the weights it points
    at; the caches are the caller's, passed with every step (their addresses are re-read when
    they change).
    """

    def __init__(
        self,
        kernels: NativeKernels,
        spec: StackSpec,
        layers: list[StackLayer],
        dims: torch.Tensor,
        table: torch.Tensor,
        wtype: int,
    ) -> None:
        self.spec, self.layers, self.dims, self.table = spec, layers, dims, table
        self._fn, self._wtype, self._reads_kv = kernels._stack, wtype, kernels.reads_kv
        self._caches: list[tuple[int, torch.Size, torch.dtype]] = []

    def _set_caches(
        self, caches: list[torch.Tensor], key: list[tuple[int, torch.Size, torch.dtype]]
    ) -> None:
        spec = self.spec
        if len(caches) != len(self.layers):
            raise ValueError(f"{len(caches)} caches for {len(self.layers)} layers")
        shape = caches[0].shape if caches else torch.Size((2, 0, 1, spec.kv_heads, spec.head_dim))
        if len(shape) != 5 or shape[0] != 2 or shape[3:] != (spec.kv_heads, spec.head_dim):
            raise ValueError(
                f"cache {tuple(shape)} is not (2, N, bs, {spec.kv_heads}, {spec.head_dim})"
            )
        dtype = caches[0].dtype if caches else torch.float32
        if not self._reads_kv(dtype):
            raise ValueError(f"{dtype} caches are not supported by this build of the kernels")
        for i, cache in enumerate(caches):
            if cache.dtype is not dtype or not cache.is_cpu or not cache.is_contiguous():
                raise ValueError(f"layer {i}: caches must be contiguous CPU {dtype} tensors")
            if cache.shape != shape:
                raise ValueError(f"layer {i}: cache {tuple(cache.shape)} != {tuple(shape)}")
            self.table[i, _SF_K_CACHE] = cache[0].data_ptr()
            self.table[i, _SF_V_CACHE] = cache[1].data_ptr()
        self.dims[6], self.dims[7] = shape[2], shape[1]
        self.dims[_SD_KV_HALF] = int(dtype is torch.float16)
        self._caches = key

    def __call__(
        self,
        x: torch.Tensor,
        caches: list[torch.Tensor],
        positions: torch.Tensor,
        slots: torch.Tensor,
        rows: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        lora: StackLoRA | None = None,
    ) -> None:
        """x (T, hidden) fp32 in place; caches one (2, N, bs, Hkv, D) per layer, all fp32 or all
        fp16; positions, slots (T,); rows, context_lens (S,) and block_tables (S, nb) int64 as
        for `paged_decode_attention`, rows covering x once; `lora`: adapters per row."""
        spec = self.spec
        key = [(c.data_ptr(), c.shape, c.dtype) for c in caches]
        if key != self._caches:
            self._set_caches(caches, key)
        _check_f32(x)
        if x.dim() != 2 or x.shape[1] != spec.hidden:
            raise ValueError(f"x must be (T, {spec.hidden})")
        t = x.shape[0]
        for v in (positions, slots, rows, context_lens, block_tables):
            if v.dtype != torch.int64 or not v.is_contiguous() or not v.is_cpu:
                raise ValueError("positions, slots, rows, lengths and tables: contiguous int64")
        if positions.shape != (t,) or slots.shape != (t,):
            raise ValueError("positions and slots must be (T,)")
        if block_tables.dim() != 2 or not (
            rows.shape == context_lens.shape == (block_tables.shape[0],)
        ):
            raise ValueError("rows, block tables and lengths disagree on the number of rows")
        # why a name: the descriptor must outlive the call that reads it
        desc = None if lora is None else lora.descriptor(t, len(self.layers))
        status = self._fn(
            self.dims.data_ptr(),
            self.table.data_ptr(),
            self._wtype,
            spec.eps,
            spec.attn_scale,
            spec.cos.data_ptr(),
            spec.sin.data_ptr(),
            x.data_ptr(),
            t,
            positions.data_ptr(),
            slots.data_ptr(),
            rows.data_ptr(),
            block_tables.data_ptr(),
            context_lens.data_ptr(),
            rows.shape[0],
            block_tables.shape[1],
            None if desc is None else desc.data_ptr(),
        )
        if status != 0:
            why = _STACK_ERRORS.get(status, f"status {status}")
            raise ValueError(f"native decoder stack refused its inputs: {why}")


_STACK_DIMS, _STACK_FIELDS = 10, 12  # cpu_kernels.c STACK_DIMS, STACK_FIELDS
# cpu_kernels.c SL_HEADER (slots, max rank, ranks, row slots, table), SL_FIELDS (A, Bt of each
# projection per layer), STACK_LORA_MAX_RANK
_STACK_LORA_HEADER, _STACK_LORA_FIELDS, STACK_LORA_MAX_RANK = 5, 8, 256
_SD_KV_HALF = 9  # cpu_kernels.c SD_KV_HALF: set per cache
_KV_DTYPES = (torch.float32, torch.float16)  # K/V cache dtypes the attention kernels read
_SF_K_CACHE, _SF_V_CACHE = 10, 11  # cpu_kernels.c SF_K_CACHE, SF_V_CACHE: set per cache
_STACK_ERRORS = {
    1: "unsupported GQA ratio, or no AVX2/FMA/F16C in this build",
    2: "a context length outside the block table",
    3: "out of memory",
    4: "a block id outside the cache",
    5: "a row outside x",
    6: "a position outside the RoPE table, a slot outside the cache, or rows not covering x once",
    7: "inconsistent dimensions or LoRA descriptor",
}
# cpu_kernels.c LLMOS_W_*; uint8: blocks of 32 (quant.pack_blocks), the type by their bytes
_WEIGHT_TYPES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.int8: 2,
    torch.bfloat16: 3,
    torch.uint8: 4,
}
_BLOCK_BYTES = {4: 320, 5: 544}  # LLMOS_W_Q4, LLMOS_W_Q8: cpu_kernels.c lin_blk_bytes
_BLOCK_MAX_K = 65536  # cpu_kernels.c LIN_BLK_MAX_K


def weight_type(packed: torch.Tensor) -> int:
    """cpu_kernels.c's LLMOS_W_* of a packed weight (checked by `_check_packed`)."""
    if packed.dtype is torch.uint8:
        return 5 if packed.dim() == 3 and packed.shape[2] == _BLOCK_BYTES[5] else 4
    return _WEIGHT_TYPES[packed.dtype]


def packed_k(packed: torch.Tensor) -> int:
    """K of a packed weight: (P, K, 16), bf16's (P, K / 2, 16, 2), or (P, K / 32, bytes) for
    blocks of 32."""
    per = 32 if packed.dtype is torch.uint8 else 2 if packed.dtype is torch.bfloat16 else 1
    return packed.shape[1] * per


def _check_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    *per_seq: torch.Tensor,
) -> bool:
    """What both attention kernels need of their tensors (`per_seq` are (S,) int64 each);
    whether the caches are fp16."""
    d = q.shape[2]
    if not (q.stride(2) == 1 and q.stride(1) == d and out.is_contiguous()):
        raise ValueError("q rows must be (H, D)-contiguous and out contiguous")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape):
        raise ValueError("K/V caches must be contiguous and of one shape")
    if q.dtype != torch.float32 or out.dtype != torch.float32:
        raise ValueError("native paged attention takes float32 queries and outputs")
    if k_cache.dtype not in _KV_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError("K/V caches must both be float32 or both float16")
    if not (q.is_cpu and k_cache.is_cpu):
        raise ValueError("native paged attention takes CPU tensors")
    if out.shape != q.shape:
        raise ValueError(f"out {tuple(out.shape)} does not match q {tuple(q.shape)}")
    for t in (block_tables, *per_seq):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError("block tables, lengths and rows must be contiguous int64")
        if t.shape[0] != block_tables.shape[0]:
            raise ValueError("block tables, lengths and rows disagree on the number of sequences")
    return k_cache.dtype is torch.float16


def _check_f32(*tensors: torch.Tensor) -> None:
    for t in tensors:  # why is_cpu, not device.type: no device object built per check
        if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous():
            raise ValueError("native kernels take contiguous float32 CPU tensors")


_lock = threading.Lock()
_loaded: NativeKernels | None = None
_tried = False


def cache_dir() -> Path:
    if os.environ.get("LLMOS_KERNEL_CACHE"):
        return Path(os.environ["LLMOS_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmos-worker" / "kernels"


def _cpu_identity() -> bytes:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep)).encode()


def build(
    compiler: str | None = None, directory: Path | None = None, extra_flags: tuple[str, ...] = ()
) -> Path:
    """Compile the kernels (or find the cached build); the path of the shared library.

    `extra_flags` follow CFLAGS: `("-mno-avx512f",)` builds the 256-bit variant on a CPU with
    AVX-512, so both variants can be tested on one machine.
    """
    cc = compiler or os.environ.get("CC") or "cc"
    flags = (*CFLAGS, *extra_flags)
    if shutil.which(cc) is None:
        raise FileNotFoundError(f"no C compiler {cc!r} on PATH")
    version = subprocess.run(
        [cc, "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), version.encode(), _cpu_identity()):
        digest.update(hashlib.sha256(part).digest())
    out_dir = directory or cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"llmos_kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *flags, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def native_kernels() -> NativeKernels | None:
    """The native kernels, built on first call; None (logged once) when they cannot be had."""
    global _loaded, _tried
    with _lock:
        if _tried:
            return _loaded
        _tried = True
        if os.environ.get("LLMOS_NATIVE_KERNELS", "1").lower() in ("0", "false", "no", "off"):
            log.info("native kernels disabled by LLMOS_NATIVE_KERNELS; using the torch path")
            return None
        try:
            _loaded = NativeKernels(build())
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
            log.warning("native kernels unavailable, using the torch path: %s", exc)
            return None
        log.info("native kernels loaded from %s", _loaded.path)
        return _loaded

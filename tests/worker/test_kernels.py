"""The native kernels against plain-torch references: paged decode and prefill attention, the
linear layers.

Every test runs on the build the worker loads and, on a CPU with AVX-512, on the 256-bit variant
too. The linear kernel is checked against x @ W.T of the weights each storage mode holds (fp32,
fp16, bf16, int8 with per-row scales, 4-bit blocks with a scale and minimum each), over row
counts around its 6-row (256-bit) and 12-row (512-bit) tiles, 16-row panels alone and in pairs,
and partial panels; int8 at the row counts that multiply 16-bit quantised activations in
integers within the error bound that quantisation promises, including the largest sums any
input can make; bf16, where the CPU has AVX512_BF16, at the row counts that round x to bf16,
against x so rounded. The decoder stack runs every layer of a step in each storage mode against
a float64 reference.

The attention reference gathers each sequence's K/V by its block table and runs
softmax(q k^T * scale) v in float64. Cases cover GQA ratios 1/3/4, head dims 64 (the vector
paths: 256-bit, and 512-bit for up to 4 heads per KV head) and 24 (the portable loops), block
sizes 1 and 16, ragged lengths ending mid-block, decode rows scattered in a larger batch, and a
q that is a strided slice of a fused QKV tensor. Bad inputs raise, never read outside the cache.
Prefill attention is checked the same way, each token of a chunk as a query over its causal
prefix: whole prompts, chunks over a cached prefix, lengths around its 16-token and 48-key tiles,
GQA ratios up to 16.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos_worker.errors import ModelLoadError
from llmos_worker.model.kernels import NativeKernels, build, native_kernels
from llmos_worker.model.quant import (
    make_linear,
    pack_blocks,
    pack_panels,
    quantize_q4,
    quantize_q8,
    unpack_blocks,
    unpack_panels,
)


@pytest.fixture(scope="module", params=["native", "256-bit"])
def kernels(request: pytest.FixtureRequest) -> NativeKernels:
    """Each test runs on the build the worker loads (-march=native) and, where that build has
    AVX-512, again on the 256-bit (AVX2) variant of the same source, which CPUs without
    AVX-512 run: both are checked on any machine that has both."""
    k = native_kernels()
    assert k is not None, "the native kernels did not build (a C compiler is part of make install)"
    if request.param == "native" or k.vector_bits != 512:
        return k
    narrow = NativeKernels(build(extra_flags=("-mno-avx512f",)))
    assert narrow.vector_bits == 256
    return narrow


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """(S, H, D) float64 attention of q[rows] over each sequence's first lens[s] cached rows."""
    h, hkv = q.shape[1], k_cache.shape[2]
    bs = k_cache.shape[1]
    out = []
    for s in range(rows.shape[0]):
        n = int(lens[s])
        blocks = tables[s, : -(-n // bs)]
        k = k_cache[blocks].reshape(-1, hkv, k_cache.shape[3])[:n].double()  # (n, Hkv, D)
        v = v_cache[blocks].reshape(-1, hkv, v_cache.shape[3])[:n].double()
        k = k.repeat_interleave(h // hkv, dim=1)  # (n, H, D)
        v = v.repeat_interleave(h // hkv, dim=1)
        qs = q[rows[s]].double()  # (H, D)
        p = torch.softmax(torch.einsum("hd,nhd->hn", qs, k) * scale, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", p, v))
    return torch.stack(out)


@pytest.mark.parametrize("kv", [torch.float32, torch.float16], ids=["fp32kv", "fp16kv"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(9, 3, 64, 16), (4, 4, 64, 1), (8, 2, 24, 16), (6, 3, 24, 4)],
)
def test_matches_reference(
    kernels: NativeKernels,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    kv: torch.dtype,
) -> None:
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    lens = torch.tensor([1, 5, 16, 17, 40, 3], dtype=torch.int64)
    nb = int(-(-lens.max() // block_size))
    num_blocks = lens.shape[0] * nb + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(kv)
    tables = torch.randperm(num_blocks, generator=g)[: lens.shape[0] * nb].view(-1, nb)
    # q as the slice of a fused (T, H + 2 Hkv, D) projection, decode rows scattered in T = 11
    qkv = torch.randn(11, heads + 2 * kv_heads, head_dim, generator=g)
    q = qkv[:, :heads]
    rows = torch.tensor([10, 0, 3, 7, 5, 1], dtype=torch.int64)
    out = torch.full((11, heads, head_dim), 7.0)
    scale = head_dim**-0.5
    kernels.paged_decode_attention(
        q, cache[0], cache[1], tables.contiguous(), lens, rows, out, scale
    )
    expected = reference(q, cache[0], cache[1], tables, lens, rows, scale)
    torch.testing.assert_close(out[rows].double(), expected, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(11, dtype=torch.bool)
    untouched[rows] = False
    assert (out[untouched] == 7.0).all()  # rows that are not decodes are left alone


def test_refuses_inconsistent_inputs(kernels: NativeKernels) -> None:
    cache = torch.zeros(2, 4, 16, 2, 64)
    q = torch.zeros(2, 4, 64)
    out = torch.zeros(2, 4, 64)
    lens = torch.tensor([20, 3])
    rows = torch.tensor([0, 1])

    def call(tables: torch.Tensor, lens: torch.Tensor = lens, rows: torch.Tensor = rows) -> None:
        kernels.paged_decode_attention(q, cache[0], cache[1], tables, lens, rows, out, 0.1)

    with pytest.raises(RuntimeError, match="status 4"):  # block id past the cache
        call(torch.tensor([[0, 4], [1, 0]]))
    with pytest.raises(RuntimeError, match="status 4"):
        call(torch.tensor([[0, -1], [1, 0]]))
    with pytest.raises(RuntimeError, match="status 2"):  # longer than the table covers
        call(torch.tensor([[0, 2], [1, 0]]), lens=torch.tensor([40, 3]))
    with pytest.raises(RuntimeError, match="status 2"):
        call(torch.tensor([[0, 2], [1, 0]]), lens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="rows outside q"):
        call(torch.tensor([[0, 2], [1, 0]]), rows=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="int64"):
        call(torch.tensor([[0, 2], [1, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match="float32"):
        kernels.paged_decode_attention(
            q.double(), cache[0], cache[1], torch.tensor([[0, 2], [1, 0]]), lens, rows, out, 0.1
        )


@pytest.mark.parametrize("kv", [torch.float32, torch.float16], ids=["fp32kv", "fp16kv"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(9, 3, 64, 16), (4, 4, 64, 1), (8, 2, 24, 16), (6, 3, 40, 4), (16, 1, 64, 16)],
)
def test_prefill_matches_reference(
    kernels: NativeKernels,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    kv: torch.dtype,
) -> None:
    g = torch.Generator().manual_seed(heads * 10 + head_dim)
    # (tokens, context): whole prompts, chunks over a cached prefix; sizes around the 16-token
    # and 48-key tiles; 70 x 100 takes the OpenMP-parallel branch
    chunks = [(1, 1), (5, 5), (16, 16), (17, 40), (33, 33), (70, 100), (48, 49), (3, 97)]
    qlens = torch.tensor([c[0] for c in chunks])
    lens = torch.tensor([c[1] for c in chunks])
    nb = int(-(-lens.max() // block_size))
    num_blocks = len(chunks) * nb + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(kv)
    tables = torch.randperm(num_blocks, generator=g)[: len(chunks) * nb].view(-1, nb).contiguous()
    starts = torch.cumsum(qlens + 2, 0) - qlens - 1  # two rows of the batch between chunks
    t = int(starts[-1] + qlens[-1]) + 1
    qkv = torch.randn(t, heads + 2 * kv_heads, head_dim, generator=g)
    q = qkv[:, :heads]  # a slice of a fused projection, as the decoder passes it
    out = torch.full((t, heads, head_dim), 7.0)
    scale = head_dim**-0.5
    kernels.paged_prefill_attention(q, cache[0], cache[1], tables, starts, qlens, lens, out, scale)
    # token i of a chunk is a query over the first context - tokens + i + 1 positions
    rows = torch.cat([torch.arange(int(s), int(s + n)) for s, n in zip(starts, qlens, strict=True)])
    seq = torch.repeat_interleave(torch.arange(len(chunks)), qlens)
    causal = torch.cat([torch.arange(c - n + 1, c + 1) for n, c in chunks])
    expected = reference(q, cache[0], cache[1], tables[seq], causal, rows, scale)
    torch.testing.assert_close(out[rows].double(), expected, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(t, dtype=torch.bool)
    untouched[rows] = False
    assert (out[untouched] == 7.0).all()  # rows of other sequences are left alone


def test_prefill_refuses_inconsistent_inputs(kernels: NativeKernels) -> None:
    cache = torch.zeros(2, 4, 16, 2, 64)
    q = torch.zeros(6, 4, 64)
    good = {
        "tables": torch.tensor([[0, 2], [1, 3]]),
        "starts": torch.tensor([0, 3]),
        "qlens": torch.tensor([3, 3]),
        "lens": torch.tensor([20, 3]),
        "out": torch.zeros(6, 4, 64),
    }

    def call(**changes: torch.Tensor) -> None:
        a = good | changes
        kernels.paged_prefill_attention(
            q, cache[0], cache[1], a["tables"], a["starts"], a["qlens"], a["lens"], a["out"], 0.1
        )

    call()  # consistent
    with pytest.raises(RuntimeError, match="status 4"):  # block id past the cache
        call(tables=torch.tensor([[0, 4], [1, 3]]))
    with pytest.raises(ValueError, match="chunk lengths"):  # more tokens than positions
        call(lens=torch.tensor([20, 2]))
    with pytest.raises(ValueError, match="chunk lengths"):
        call(qlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="chunk lengths"):  # longer than the table covers
        call(lens=torch.tensor([33, 3]))
    with pytest.raises(ValueError, match="rows outside q"):
        call(starts=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="rows outside q"):
        call(starts=torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="disagree"):
        call(starts=torch.tensor([0]))
    with pytest.raises(ValueError, match="does not match q"):
        call(out=torch.zeros(5, 4, 64))


def test_build_is_cached_per_directory(tmp_path: Path) -> None:
    first = build(directory=tmp_path)
    assert first.parent == tmp_path and first.suffix == ".so"
    mtime = first.stat().st_mtime_ns
    assert build(directory=tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="no C compiler"):
        build(compiler="no-such-cc", directory=tmp_path)


@pytest.mark.parametrize(
    ("env", "expected"),
    [({"LLMOS_NATIVE_KERNELS": "0"}, "None"), ({"CC": "no-such-cc"}, "None"), ({}, "loaded")],
)
def test_fallback_when_unavailable(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    """Disabled or without a compiler, the worker carries on with the torch path."""
    code = (
        "from llmos_worker.model.kernels import native_kernels\n"
        "k = native_kernels()\n"
        "print('None' if k is None else 'loaded')\n"
    )
    run_env = os.environ | {"LLMOS_KERNEL_CACHE": str(tmp_path / "cache")} | env
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=run_env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


@pytest.mark.parametrize("rows", [1, 3, 70])  # 70: the OpenMP-parallel branch
def test_per_layer_ops_match_torch(kernels: NativeKernels, rows: int) -> None:
    import torch.nn.functional as F

    from llmos_worker.model.llama import rms_norm
    from llmos_worker.model.rope import apply_rope, cos_sin_table

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 40, generator=g)
    delta = torch.randn(rows, 40, generator=g)
    w = torch.randn(40, generator=g)
    stream = x.clone()
    out = kernels.add_rms_norm(stream, delta, w, 1e-5)
    torch.testing.assert_close(stream, x + delta)  # residual updated in place
    torch.testing.assert_close(out, rms_norm(x + delta, w, 1e-5), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kernels.add_rms_norm(x, None, w, 1e-5), rms_norm(x, w, 1e-5))

    # RoPE on the first 5 of 7 heads of a (T, 7 * 16) row; the last 2 heads stay as they were
    cos, sin = cos_sin_table(1.0 / (10000 ** (torch.arange(0, 16, 2) / 16)), 512)
    qkv = torch.randn(rows, 7 * 16, generator=g)
    positions = torch.randint(0, 512, (rows,), generator=g)
    expected = qkv.clone().view(rows, 7, 16)
    expected[:, :5] = apply_rope(expected[:, :5], cos[positions][:, None], sin[positions][:, None])
    kernels.rope_(qkv, 5, 16, positions, cos, sin)
    torch.testing.assert_close(qkv.view(rows, 7, 16), expected, atol=1e-6, rtol=1e-5)

    # SiLU(gate) * up with an intermediate size that is not a multiple of 8 and extreme gates
    gate_up = torch.randn(rows, 2 * 37, generator=g) * 30
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -88.5])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


def test_per_layer_ops_refuse_bad_inputs(kernels: NativeKernels) -> None:
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.add_rms_norm(x.double(), None, torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="does not match"):
        kernels.add_rms_norm(x, torch.zeros(3, 8), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        kernels.add_rms_norm(x, None, torch.zeros(7), 1e-5)
    table = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="outside the RoPE table"):
        kernels.rope_(x, 1, 8, torch.tensor([0, 4]), table, table)
    with pytest.raises(ValueError, match="heads"):
        kernels.rope_(x, 2, 8, torch.tensor([0, 1]), table, table)
    with pytest.raises(ValueError, match="gate_up"):
        kernels.silu_mul(torch.zeros(2, 7))


# -- linear layers on packed weights -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "fp16", "int8", "bf16"])
# 6- and 12-row tiles, remainders, one row; from 24 rows fp16/int8 panels are widened once
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 25, 40])
@pytest.mark.parametrize(
    ("n", "k"),
    # partial panels, odd K, 1-5 panels (split over threads: single panels and pairs);
    # 3000: 12-row passes
    [(48, 64), (37, 19), (5, 3), (33, 3000), (80, 40)],
)
def test_linear_matches_dense(kernels: NativeKernels, mode: str, rows: int, n: int, k: int) -> None:
    """The packed kernel computes x @ W.T of exactly the weights the layer stores."""
    g = torch.Generator().manual_seed(rows * 100 + n)
    weight = torch.randn(n, k, generator=g)
    mm = make_linear(weight, mode)
    dense = mm.dense().double()  # what the stored (fp16 / int8 * scale) weights are worth
    mm.pack()
    # bf16 panels hold k in pairs: an odd K stays dense, on torch's fp32 products
    assert mm.packed == (mode != "bf16" or k % 2 == 0)
    wide = torch.randn(rows, k + 5, generator=g)
    for x in (wide[:, :k].contiguous(), wide[:, 2 : k + 2]):  # contiguous, and a strided slice
        got = mm(x, kernels)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        want = x.double() @ dense.T
        if mode == "int8" and rows >= kernels.int8_integer_rows:
            assert_within_integer_bound(got, x, dense, want)
        elif mode == "bf16" and mm.packed and 0 < kernels.bf16_dot_rows <= rows:
            # x rounded to bf16 (nearest even, as torch rounds), products summed in fp32
            rounded = x.to(torch.bfloat16).double() @ dense.T
            torch.testing.assert_close(got.double(), rounded, atol=1e-4, rtol=1e-4)
            assert ((got.double() - want).abs() <= x.abs().double() @ dense.abs().T / 256).all()
        else:
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    if mode == "int8":  # and those weights are close to the originals
        assert (dense.float() - weight).abs().max() <= weight.abs().amax(1).max() / 254 + 1e-6


@pytest.mark.parametrize("rows", [12, 16, 31, 33, 64, 200])
@pytest.mark.parametrize(("n", "k"), [(80, 576), (37, 1536), (48, 96)])
def test_bf16_rounded_rows_at_model_shapes(
    kernels: NativeKernels, rows: int, n: int, k: int
) -> None:
    """K a multiple of 32, as in the model's layers: where the CPU has AMX-BF16 these products
    run on AMX tiles (x padded to whole 16-row tiles, 32-row blocks, passes of rows, a single
    last panel), else on vdpbf16ps; either way they are x rounded to bf16 times the stored
    weights, summed in fp32, and the padding rows never reach the output. A build without
    AVX512_BF16 multiplies fp32 rows."""
    g = torch.Generator().manual_seed(rows + n)
    mm = make_linear(torch.randn(n, k, generator=g), "bf16")
    dense = mm.dense().double()
    mm.pack()
    x = torch.randn(rows, k, generator=g)
    got = mm(x, kernels)
    rounded = 0 < kernels.bf16_dot_rows <= rows
    want = (x.to(torch.bfloat16) if rounded else x).double() @ dense.T
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    # the last row repeated alone gives its numbers inside the batch (padding does not leak)
    alone = mm(torch.cat([x[-1:]] * 12), kernels)
    torch.testing.assert_close(alone, got[-1:].expand(12, n), atol=1e-5, rtol=1e-5)


def assert_within_integer_bound(
    got: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, want: torch.Tensor
) -> None:
    """The integer path's promise: each x value is rounded to the nearest multiple of its row's
    step max|x_row| / 32767, so y[i, n] is within sum_k |W[n, k]| * step_i / 2 of x @ W.T (plus
    fp32 rounding of the sums), and the errors, summed over many rows and columns, are as large
    as rounding errors uniform in +-step / 2 make them (a coarser step fails this part)."""
    step = x.abs().amax(1, keepdim=True).double() / 32767
    bound = step / 2 * dense.abs().sum(1)[None, :]
    err = (got.double() - want).abs()
    assert (err <= bound * 1.001 + 1e-6 * (1 + want.abs())).all(), float((err - bound).max())
    rounding_var = step.pow(2) / 12 * dense.pow(2).sum(1)[None, :]
    assert float(err.pow(2).sum()) <= 2 * float(rounding_var.sum()) + 1e-12


@pytest.mark.parametrize("k", [576, 1536, 1031])  # one int32 run; three (512, 512, 512); odd
def test_int8_integer_path(kernels: NativeKernels, k: int) -> None:
    """int8 weights at >= int8_integer_rows rows: 16-bit rows of x multiplied in integers.
    Rows with an outlier channel, an all-zero row, rows of one repeated extreme value (the
    largest int32 sums any input can make: they must not wrap), and N past a panel edge."""
    rows, n = kernels.int8_integer_rows + 7, 37
    g = torch.Generator().manual_seed(k)
    mm = make_linear(torch.randn(n, k, generator=g), "int8")
    dense = mm.dense().double()
    mm.pack()
    x = torch.randn(rows, k, generator=g)
    x[:, 5] *= 300.0  # an outlier channel: every row's step is set by it
    x[3] = 0.0
    x[4] = -7.5  # |q| = 32767 everywhere: sums of K * 32767 * 127 per channel
    x[5] = 1e-30  # tiny but not zero: scaled up, not flushed
    x[6] = 1e-38  # below the floor: taken as zero (its products are below 1e-35)
    want = x.double() @ dense.T
    got = mm(x, kernels)
    assert_within_integer_bound(got, x, dense, want)
    assert torch.equal(got[3], torch.zeros(n)) and torch.equal(got[6], torch.zeros(n))
    # a weight row whose int8 values all equal +-127 against x[4]: the extreme sum, exact
    extreme = make_linear(torch.ones(n, k) * torch.tensor([1.0, -1.0]).repeat(n)[:n, None], "int8")
    extreme.pack()
    y = extreme(x, kernels)
    torch.testing.assert_close(
        y[4].double(), (-7.5 * k * extreme.dense().double()[:, 0]), rtol=1e-6, atol=0
    )
    # fewer rows than the integer path's threshold: fp32 products, as for the other modes
    few = x[: kernels.int8_integer_rows - 1]
    torch.testing.assert_close(
        mm(few, kernels).double(), want[: few.shape[0]], atol=1e-3, rtol=1e-5
    )


def test_pack_roundtrip_and_zero_padding() -> None:
    w = torch.arange(37 * 5, dtype=torch.float32).view(37, 5)
    packed = pack_panels(w)
    assert packed.shape == (3, 5, 16)
    assert packed[2, :, 5:].abs().sum() == 0  # rows 37..47 do not exist: zeros
    assert torch.equal(unpack_panels(packed, 37), w)
    # bf16 in k pairs: [p, t, j, e] holds W[16p + j, 2t + e]
    wb = torch.arange(37 * 6, dtype=torch.float32).view(37, 6).to(torch.bfloat16)
    pairs = pack_panels(wb)
    assert pairs.shape == (3, 3, 16, 2) and pairs.dtype == torch.bfloat16
    assert torch.equal(pairs[1, 2, 3], wb[19, 4:6])
    assert pairs[2, :, 5:].abs().sum() == 0
    assert torch.equal(unpack_panels(pairs, 37), wb)
    with pytest.raises(ValueError, match="K must be even"):
        pack_panels(torch.zeros(4, 5, dtype=torch.bfloat16))


# 4-row tiles and remainders, one row; from 96 rows (512-bit; 256-bit: from 8) panels are
# dequantised to fp32 tiles
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 25, 40, 101])
@pytest.mark.parametrize(
    ("n", "k"),
    # one block; partial panels; 1-5 panels alone and in pairs; 3008: 94 blocks, 12-row passes
    [(5, 32), (37, 96), (48, 64), (80, 576), (33, 3008)],
)
@pytest.mark.parametrize("mode", ["int4", "q8_0"])
def test_block_linear_matches_dense(
    kernels: NativeKernels, mode: str, rows: int, n: int, k: int
) -> None:
    """Blocks of 32 (4-bit with a scale and minimum, 8-bit with a scale): up to 95 rows sum
    x * q per block and scale by d (and m); more rows multiply the panels dequantised to fp32.
    Either way x @ W.T of the weights d * q (+ m) the layer holds. A row alone (the last of a
    count that leaves one over the 4-row tiles) runs in integers where the build has VNNI: its
    x is off by half a step of its block (test_block_linear_one_row_in_integers)."""
    g = torch.Generator().manual_seed(rows * 100 + n)
    w = torch.randn(n, k, generator=g)
    mm = make_linear(w, mode)
    dense = mm.dense().double()
    mins = _block_mins(w, mode)
    mm.pack()
    alone = [rows - 1] if kernels.block_vnni and rows < 96 and rows % 4 == 1 else []
    wide = torch.randn(rows, k + 5, generator=g) + 0.5  # a mean: the m * sum(x) term counts
    for x in (wide[:, :k].contiguous(), wide[:, 2 : k + 2]):
        got = mm(x, kernels)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        # fp32 sums: relative to the sizes of the products summed, not to the (cancelled) result
        scale = x.abs().double() @ dense.abs().T
        bound = 2e-6 * scale + 1e-6
        if alone:
            half_steps = _integer_steps(x[alone]) / 2
            bound[alone] += half_steps @ (dense - mins).abs().T
        assert ((got.double() - x.double() @ dense.T).abs() <= bound).all()


def _block_mins(w: torch.Tensor, mode: str) -> torch.Tensor:
    """The m of each weight's block (int4), expanded to the weights' shape; q8_0: zeros."""
    if mode != "int4":
        return torch.zeros(w.shape, dtype=torch.float64)
    return quantize_q4(w)[2].double().repeat_interleave(32, 1)


def _integer_steps(x: torch.Tensor) -> torch.Tensor:
    """The step of each value of x on the 1-row integer path: max|x| of its block of 32 / 32512
    (0 for a block with nothing above 1e-30), as float64 of x's shape."""
    amax = x.view(x.shape[0], -1, 32).abs().amax(-1, keepdim=True)
    step = torch.where(amax > 1e-30, amax / torch.tensor(32512.0), torch.zeros(()))
    return step.double().expand(-1, -1, 32).reshape(x.shape)


def _integer_x(x: torch.Tensor) -> torch.Tensor:
    """x as the 1-row integer path rounds it: q = round(x * 32512 / max|x_block|) in fp32
    (nearest, ties to even, as the kernel's conversion), times the block's step."""
    b = x.view(x.shape[0], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 1e-30, torch.tensor(32512.0) / amax, torch.zeros(()))
    return (b * inv).round().double().view(x.shape) * _integer_steps(x)


@pytest.mark.parametrize("mode", ["int4", "q8_0"])
def test_block_linear_one_row_in_integers(kernels: NativeKernels, mode: str) -> None:
    """One row against block weights: with VNNI (`block_vnni`) x is rounded per block of 32 to
    16-bit steps of max|x_block| / 32512, split into two int8 halves, and the products with the
    weights' q summed in int32 are exact, so the result is x-hat @ (d q).T (+ m @ the exact x)
    up to the fp32 sums of the blocks; without VNNI the fp32 path computes x @ W.T. Blocks of x
    that are zero, too small to scale (taken as zero), one-sided or dominated by an outlier; the
    extreme q of each kind (0 and 15; -128 and 127, which Q8_0 files may hold)."""
    g = torch.Generator().manual_seed(11)
    n, k = 37, 3008
    w = torch.randn(n, k, generator=g)
    mm = make_linear(w, mode)
    if mode == "int4":
        q, d, m = quantize_q4(w)
        q[:, :32:2], q[:, 1:32:2] = 0, 15
        mm.weight = pack_blocks(q, d, m)
    else:
        q, d = quantize_q8(w)
        q[:, :32:2], q[:, 1:32:2] = -128, 127
        mm.weight = pack_blocks(q, d)
    mins = _block_mins(w, mode)  # the extreme q leave each block's m as it was
    dense = mm.dense().double()
    mm.pack()
    x = torch.randn(1, k, generator=g) + 0.5
    x[0, 32:64] = 0.0
    x[0, 64:96] = 1e-35  # nothing above 1e-30: taken as zero on the integer path
    x[0, 96:128] = x[0, 96:128].abs()
    x[0, 128:160] *= 1e-3
    x[0, 130] = 1e4  # one outlier: its block's other values keep about 7 bits
    plain = torch.randn(1, k, generator=g) + 0.5
    for row in (x, plain):
        got = mm(row, kernels).double()
        used = _integer_x(row) if kernels.block_vnni else row.double()
        want = used @ (dense - mins).T + row.double() @ mins.T
        scale = used.abs() @ (dense - mins).abs().T + row.abs().double() @ mins.abs().T
        assert ((got - want).abs() <= 2e-6 * scale + 1e-6).all()
    if kernels.block_vnni:  # the rounding shows: x-hat explains the answer, x does not
        exact = plain.double() @ dense.T
        assert (got - want).abs().sum() < 0.25 * (got - exact).abs().sum()


def test_int4_blocks_quantise_and_pack() -> None:
    """Per row and block of 32: m = min, d = (max - min) / 15 in fp16, q rounded against them;
    weights that already are d * q + m (as GGUF's Q4_1 stores them) come back bit for bit."""
    g = torch.Generator().manual_seed(3)
    n, k = 37, 96
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    q[:, ::32], q[:, 1::32] = 0, 15  # every block reaches both ends, as Q4_1's do
    d = (torch.rand(n, k // 32, generator=g) * 0.05 + 1e-3).half()
    m = (-torch.rand(n, k // 32, generator=g)).half()
    w = d.float().repeat_interleave(32, 1) * q.float() + m.float().repeat_interleave(32, 1)
    w[4, 32:64] = 0.25  # a constant block: d = 0, every weight m
    got_q, got_d, got_m = quantize_q4(w)
    packed = pack_blocks(got_q, got_d, got_m)
    assert packed.shape == (3, 3, 320) and packed.dtype == torch.uint8
    assert torch.equal(unpack_blocks(packed, n), w)
    assert float(got_d[4, 1]) == 0.0 and torch.equal(
        got_q[4, 32:64], torch.zeros(32, dtype=torch.uint8)
    )
    assert packed[2, :, 64:].view(3, 16, 16)[:, :, 5:].eq(0).all()  # rows 37..47: zeros
    # any weights: each within half a step (d / 2) of its block's grid, plus fp16 rounding of m
    x = torch.randn(n, k, generator=g)
    back = unpack_blocks(pack_blocks(*quantize_q4(x)), n)
    blocks = x.view(n, -1, 32)
    step = (blocks.amax(-1) - blocks.amin(-1)) / 15
    err = (back - x).view(n, -1, 32).abs().amax(-1)
    assert (err <= step / 2 + blocks.abs().amax(-1) * 2e-3).all()
    with pytest.raises(ModelLoadError, match="multiple of 32; a projection has 40"):
        make_linear(torch.zeros(8, 40), "int4")
    with pytest.raises(ModelLoadError, match="beyond fp16's range"):
        make_linear(torch.full((8, 32), 1e6), "int4")


def test_int8_blocks_quantise_and_pack() -> None:
    """Per row and block of 32: d = max|w| / 127 in fp16, q rounded against it; weights that
    already are d * q (as GGUF's Q8_0 stores them) come back bit for bit."""
    g = torch.Generator().manual_seed(4)
    n, k = 21, 64
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    q[:, ::32] = 127  # every block reaches the end of the range, as Q8_0's do
    d = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-4).half()
    w = d.float().repeat_interleave(32, 1) * q.float()
    w[3, :32] = 0.0  # an all-zero block
    got_q, got_d = quantize_q8(w)
    assert torch.equal(got_q[:, 32:], q[:, 32:]) and float(got_d[3, 0]) == 0.0
    packed = pack_blocks(got_q, got_d)
    assert packed.shape == (2, 2, 544) and packed.dtype == torch.uint8
    assert torch.equal(unpack_blocks(packed, n), w)
    # any weights: each within half a step (d / 2) of its block's grid
    x = torch.randn(n, k, generator=g)
    back = unpack_blocks(pack_blocks(*quantize_q8(x)), n)
    step = x.view(n, -1, 32).abs().amax(-1) / 127
    err = (back - x).view(n, -1, 32).abs().amax(-1)
    assert (err <= step / 2 * 1.01 + 1e-7).all()


def test_linear_refuses_bad_inputs(kernels: NativeKernels) -> None:
    w = pack_panels(torch.zeros(20, 8))
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="does not hold 40 rows"):
        kernels.linear(x, w, 40)
    with pytest.raises(ValueError, match="columns"):
        kernels.linear(torch.zeros(3, 9), w, 20)
    with pytest.raises(ValueError, match="packed"):
        kernels.linear(x, torch.zeros(20, 8), 20)
    with pytest.raises(ValueError, match="k pairs"):  # bf16 panels not in k pairs
        kernels.linear(x, w.to(torch.bfloat16), 20)
    with pytest.raises(ValueError, match="unit column stride"):
        kernels.linear(torch.zeros(8, 3).T, w, 20)
    with pytest.raises(ValueError, match="need a scale"):
        kernels.linear(x, w.to(torch.int8), 20)
    with pytest.raises(ValueError, match="other types none"):
        kernels.linear(x, w, 20, torch.ones(20))
    with pytest.raises(ValueError, match=r"scale must be \(20,\)"):
        kernels.linear(x, w.to(torch.int8), 20, torch.ones(21))


# -- the whole decoder stack in one call -------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS, BS, NBLOCKS = 40, 6, 2, 8, 44, 3, 4, 16


def _stack_case(
    mode: str, seed: int = 0, kv: torch.dtype = torch.float32, extra: int = 0
) -> dict[str, Any]:
    """Random layers in `mode`, `kv` caches holding a cached prefix, and a step of 6 rows: three
    decodes (contexts 5, 9 and 1) and a 3-token chunk over a 6-token cached prefix, the rows in
    a scrambled order; `extra` (<= 6) more decodes, each in a block of its own, append rows
    (enough rows to take int8's integer path). int4 takes wider layers (hidden 64, head_dim 16,
    intermediate 96): its blocks need every K a multiple of 32."""
    from llmos_worker.model.kernels import StackLayer, StackSpec
    from llmos_worker.model.rope import cos_sin_table

    g = torch.Generator().manual_seed(seed)
    hidden, hd, inter = (64, 16, 96) if mode == "int4" else (HIDDEN, HEAD_DIM, INTER)
    cos, sin = cos_sin_table(1.0 / (10000 ** (torch.arange(0, hd, 2) / hd)), 64)
    spec = StackSpec(hidden, HEADS, KV_HEADS, hd, inter, 1e-5, hd**-0.5, cos, sin)
    shapes = {
        "qkv": ((HEADS + 2 * KV_HEADS) * hd, hidden),
        "o": (hidden, HEADS * hd),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
    }
    layers, dense = [], []
    for _ in range(LAYERS):
        mms = {
            name: make_linear(torch.randn(*s, generator=g) * 0.3, mode)
            for name, s in shapes.items()
        }
        dense.append({name: mm.dense().double() for name, mm in mms.items()})
        for mm in mms.values():
            mm.pack()
        norms = (
            1 + 0.1 * torch.randn(hidden, generator=g),
            1 + 0.1 * torch.randn(hidden, generator=g),
        )
        dense[-1] |= {"in": norms[0].double(), "post": norms[1].double()}
        layers.append(StackLayer(*norms, *((mm.weight, mm.scale) for mm in mms.values())))
    caches = [torch.randn(2, NBLOCKS, BS, KV_HEADS, hd, generator=g).to(kv) for _ in range(LAYERS)]
    # sequences: (block table, context after this step, tokens this step)
    free = [4, 8, 10, 11, 13, 15][:extra]  # blocks no other sequence uses
    tables = torch.tensor(
        [[3, 7, 0], [12, 1, 9], [5, 0, 0], [14, 2, 6]] + [[b, 0, 0] for b in free]
    )
    seq_of_entry = [0, 1, 2, 3, 3, 3] + [4 + i for i in range(extra)]
    lens = torch.tensor([5, 9, 1, 7, 8, 9] + [1 + i % BS for i in range(extra)])
    positions = lens - 1
    rows = torch.tensor([4, 0, 5, 1, 3, 2] + [6 + i for i in range(extra)])  # x row of each entry
    slots = torch.empty(6 + extra, dtype=torch.int64)
    for e, s in enumerate(seq_of_entry):
        p = int(positions[e])
        slots[rows[e]] = tables[s, p // BS] * BS + p % BS
    return {
        "spec": spec,
        "layers": layers,
        "dense": dense,
        "caches": caches,
        "x": torch.randn(6 + extra, hidden, generator=g),
        "positions": positions[torch.argsort(rows)].contiguous(),  # by x row
        "slots": slots,
        "rows": rows,
        "tables": tables[torch.tensor(seq_of_entry)].contiguous(),
        "lens": lens,
    }


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x with each row rounded to multiples of max|x_row| / 32767: the integer path's inputs."""
    step = x.abs().amax(-1, keepdim=True) / 32767
    return torch.round(x / step) * step


def _stack_reference(
    case: dict[str, Any], rounding: str | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same step in float64 torch ops: x after every layer, and the caches (K/V rounded to
    the caches' dtype as they are written); `rounding`: each projection's input rounded as the
    int8 integer path ("int16") or the bf16 dot-product path ("bf16") rounds it."""
    import torch.nn.functional as F

    from llmos_worker.model.rope import apply_rope

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def q(x: torch.Tensor) -> torch.Tensor:
        if rounding == "int16":
            return quantize_rows(x)
        return x.to(torch.bfloat16).double() if rounding == "bf16" else x

    spec = case["spec"]
    x = case["x"].double()
    caches = [c.double().clone() for c in case["caches"]]
    pos = case["positions"]
    cos, sin = spec.cos.double()[pos][:, None], spec.sin.double()[pos][:, None]
    t, hd = x.shape[0], spec.head_dim
    for w, cache in zip(case["dense"], caches, strict=True):
        qkv = (q(norm(x, w["in"])) @ w["qkv"].T).view(t, HEADS + 2 * KV_HEADS, hd)
        qk = apply_rope(qkv[:, : HEADS + KV_HEADS], cos, sin)
        kv = case["caches"][0].dtype
        k, v = qk[:, HEADS:].to(kv).double(), qkv[:, HEADS + KV_HEADS :].to(kv).double()
        cache.view(2, -1, KV_HEADS, hd)[0][case["slots"]] = k
        cache.view(2, -1, KV_HEADS, hd)[1][case["slots"]] = v
        att = torch.empty(t, HEADS, hd, dtype=torch.float64)
        rows = case["rows"]
        att[rows] = reference(
            qk[:, :HEADS], cache[0], cache[1], case["tables"], case["lens"], rows, spec.attn_scale
        )
        x = x + q(att.view(t, -1)) @ w["o"].T
        gate, up = (q(norm(x, w["post"])) @ w["gate_up"].T).chunk(2, dim=-1)
        x = x + q(F.silu(gate) * up) @ w["down"].T
    return x, caches


@pytest.mark.parametrize(
    ("mode", "kv", "extra"),
    [
        ("none", torch.float32, 0),
        ("fp16", torch.float32, 0),
        ("int8", torch.float32, 0),
        ("none", torch.float16, 0),
        ("int8", torch.float16, 0),
        ("int8", torch.float32, 6),
        ("bf16", torch.float32, 0),
        ("bf16", torch.float32, 6),
        ("int4", torch.float32, 0),
        ("int4", torch.float32, 6),
    ],
    ids=[
        "none",
        "fp16",
        "int8",
        "none-fp16kv",
        "int8-fp16kv",
        "int8-integer",
        "bf16",
        "bf16-12",
        "int4",
        "int4-12",
    ],
)
def test_decoder_stack_matches_reference(
    kernels: NativeKernels, mode: str, kv: torch.dtype, extra: int
) -> None:
    """All layers in one call: RoPE, K/V written at their slots, decodes and a chunk whose rows
    read each other's new K/V, the projections in each storage mode, fp32 and fp16 caches; with
    12 rows, int8's integer products (16-bit rows of x: within ~1e-4 of the exact result) and,
    with AVX512_BF16, bf16's products of bf16-rounded rows."""
    case = _stack_case(mode, kv=kv, extra=extra)
    rows = case["x"].shape[0]
    integer = mode == "int8" and rows >= kernels.int8_integer_rows
    bf16 = mode == "bf16" and 0 < kernels.bf16_dot_rows <= rows
    assert integer == (mode == "int8" and extra > 0)
    stack = kernels.bind_stack(case["spec"], case["layers"])
    x = case["x"].clone()
    stack(
        x,
        case["caches"],
        case["positions"],
        case["slots"],
        case["rows"],
        case["tables"],
        case["lens"],
    )
    want_x, want_caches = _stack_reference(case, "int16" if integer else "bf16" if bf16 else None)
    # fp16 caches: the float64 reference rounds K/V computed in float64, the kernel K/V computed
    # in fp32, so a value near a rounding boundary may land one fp16 ulp (~1e-3) apart
    tol = 1e-4 if kv is torch.float32 else 2e-3
    if integer:
        # the reference rounds float64 activations, the kernel fp32 ones: a value within fp32
        # noise of a rounding boundary lands one step (up to ~1e-3 here) apart, and the step
        # carries through the layers; rows without such a value agree to fp32 rounding
        tol = 5e-3
        row_err = (x.double() - want_x).abs().amax(1)
        assert (row_err < 1e-4).float().mean() >= 0.5, row_err
    if bf16:
        # as for int8, and bf16's steps are 2^-8 relative: a boundary value is ~4e-3 off
        tol = 2e-2
    torch.testing.assert_close(x.double(), want_x, atol=tol, rtol=tol)
    for got, want in zip(case["caches"], want_caches, strict=True):
        torch.testing.assert_close(got.double(), want, atol=tol / 10, rtol=tol / 2)
        if kv is torch.float16:  # rounded to nearest as torch rounds: apart only at a boundary
            assert (got.double() != want).float().mean() < 0.01


def test_decoder_stack_refuses_bad_inputs(kernels: NativeKernels) -> None:
    case = _stack_case("none")
    stack = kernels.bind_stack(case["spec"], case["layers"])
    before = [c.clone() for c in case["caches"]]

    def call(**changes: torch.Tensor | list[torch.Tensor]) -> None:
        args = {
            "x": case["x"].clone(),
            "caches": case["caches"],
            "positions": case["positions"],
            "slots": case["slots"],
            "rows": case["rows"],
            "block_tables": case["tables"],
            "context_lens": case["lens"],
        } | changes
        stack(**args)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="position outside the RoPE table"):
        call(positions=case["positions"] + 64)
    with pytest.raises(ValueError, match="slot outside the cache"):
        call(slots=case["slots"] + NBLOCKS * BS)
    with pytest.raises(ValueError, match="not covering x once"):
        call(rows=torch.tensor([4, 0, 5, 1, 3, 3]))
    with pytest.raises(ValueError, match="block id outside the cache"):
        call(block_tables=case["tables"] + NBLOCKS)
    with pytest.raises(ValueError, match="context length outside"):
        call(context_lens=case["lens"] * 10)
    with pytest.raises(ValueError, match="2 caches for 3 layers"):
        call(caches=case["caches"][:2])
    with pytest.raises(ValueError, match=r"is not \(2, N, bs, 2, 8\)"):
        call(caches=[torch.zeros(2, 4, 4, 2, 4)] * LAYERS)
    with pytest.raises(ValueError, match="must be \\(T, 40\\)"):
        call(x=torch.zeros(6, 41))
    with pytest.raises(ValueError, match="contiguous int64"):
        call(positions=case["positions"].int())
    for got, want in zip(case["caches"], before, strict=True):
        assert torch.equal(got, want)  # nothing was written by a refused call
    layer = dataclasses.replace(case["layers"][0], input_norm=torch.ones(3))
    with pytest.raises(ValueError, match="layer 0: norm weights"):
        kernels.bind_stack(case["spec"], [layer])
    layer = dataclasses.replace(case["layers"][0], o=(case["layers"][0].o[0].half(), None))
    with pytest.raises(ValueError, match="layer 0 o: weights of mixed types"):
        kernels.bind_stack(case["spec"], [layer])

"""Paged attention over a block-structured KV cache, for one flat batch of mixed sequences.

`AttentionPlan.from_batch` turns a `ForwardBatch` into gather indices and masks ONCE per step;
every layer then reuses them. Single-token decodes are attended in groups of similar context
length: a group's K/V are gathered block-wise by block table into a padded (S, Hkv, L, D) tensor
with an additive length mask, and the GQA query heads of one K/V head ride along the query
axis, so one SDPA call serves the whole group without repeating K/V. Grouping by length bounds
the padding (at most ~2x the shortest context in a group) at the price of a few more calls.
Prefill chunks (several tokens) are attended one sequence at a time with a causal mask offset by
the number of tokens already in the cache.

With the native kernels (`llmos_worker.model.kernels`, CPU fp32) decodes skip the gather: one
call per layer attends every decode row against K/V read in place through the block tables.
Short prefill chunks over a cached prefix (a prefix-cache hit, a small chunk of a long prompt)
ride in the same call, one row per token with its causal context length: no gather, no mask.
Every other prefill chunk goes to the native prefill kernel (blocked, online softmax, K/V read
in place; the chunk's own K/V are written to the cache first), one call per layer for all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmos_worker.model.batch import ForwardBatch
from llmos_worker.model.kernels import NativeKernels

MAX_DECODE_GROUPS = 4  # why: each group costs one gather + one SDPA call per layer
# Longest cached-prefix prefill chunk attended by the native decode kernel, row by row (so a
# step of such chunks and decodes can be one whole-stack call); longer chunks go to the blocked
# prefill kernel, which wins once many rows share the same keys.
NATIVE_PREFILL_ROWS = 64


@dataclass
class PrefillChunk:
    """One sequence computing `end - start` tokens with `context_len` K/V rows after this step."""

    start: int
    end: int
    context_len: int
    blocks: torch.Tensor | None  # (nb,) physical blocks to read; None: no cached prefix
    mask: torch.Tensor | None  # (q, context_len) additive: 0 or -inf; None: plain causal


@dataclass
class DecodeGroup:
    """Single-token decodes attended together, padded to the group's longest context."""

    rows: torch.Tensor  # (Sd,) rows of the flat batch
    blocks: torch.Tensor  # (Sd * nb,) physical blocks, sequence after sequence
    mask: torch.Tensor  # (Sd, 1, 1, nb * block_size) additive: 0 or -inf past each length


@dataclass
class NativeDecodes:
    """Every single-token decode of the step, and every token of short prefill chunks over a
    cached prefix, for one native kernel call per layer."""

    kernels: NativeKernels
    rows: torch.Tensor  # (Sd,) int64 rows of the flat batch
    block_tables: torch.Tensor  # (Sd, nb) int64, contiguous: each row's sequence's table
    context_lens: torch.Tensor  # (Sd,) int64: K/V rows each query row attends to


@dataclass
class NativePrefills:
    """Every prefill chunk of the step not attended row by row, for one native call per layer."""

    kernels: NativeKernels
    starts: torch.Tensor  # (P,) int64: first row of each chunk in the flat batch
    query_lens: torch.Tensor  # (P,) int64: tokens of each chunk
    context_lens: torch.Tensor  # (P,) int64: K/V rows of its sequence after this step
    block_tables: torch.Tensor  # (P, nb) int64, contiguous


@dataclass
class AttentionPlan:
    """Per-step indices shared by all layers."""

    slot_mapping: torch.Tensor  # (T,) flat KV slot of each new token
    decodes: list[DecodeGroup]
    prefills: list[PrefillChunk]
    decode_only: bool  # every row is a decode and there is one group in batch order
    native: NativeDecodes | None = None
    native_prefills: NativePrefills | None = None

    @classmethod
    def from_batch(
        cls,
        batch: ForwardBatch,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        kernels: NativeKernels | None = None,
    ) -> AttentionPlan:
        """Indices for `batch`; decodes go to `kernels` when given (CPU fp32 only)."""
        starts = batch.query_start_loc.tolist()
        ctx = batch.context_lens.tolist()
        decodes: list[int] = []  # sequence indices
        prefills: list[PrefillChunk] = []
        # rows for the native kernel: (row of the flat batch, sequence, context length)
        native_rows: list[tuple[int, int, int]] = []
        # chunks for the native prefill kernel: (sequence, first row, tokens, context length)
        native_chunks: list[tuple[int, int, int, int]] = []
        tables = batch.block_tables.to(device)
        for s, c in enumerate(ctx):
            start, end = starts[s], starts[s + 1]
            q = end - start
            if q == 1 and c > 1:
                if kernels is not None:
                    native_rows.append((start, s, c))
                else:
                    decodes.append(s)
            elif kernels is not None and q < c and q <= NATIVE_PREFILL_ROWS:
                # token i of the chunk sees the c - q cached rows and the chunk up to itself
                native_rows += [(start + i, s, c - q + 1 + i) for i in range(q)]
            elif kernels is not None:
                native_chunks.append((s, start, q, c))
            elif q == c:  # why: whole prompt in this chunk -> K/V come straight from the step
                prefills.append(PrefillChunk(start, end, c, None, None))
            else:
                nb = -(-c // block_size)
                key_pos = torch.arange(c, device=device)
                query_pos = torch.arange(c - q, c, device=device)  # c - q tokens were cached
                future = key_pos[None, :] > query_pos[:, None]  # (q, c)
                mask = torch.zeros(future.shape, dtype=dtype, device=device)
                prefills.append(
                    PrefillChunk(
                        start, end, c, tables[s, :nb], mask.masked_fill_(future, float("-inf"))
                    )
                )
        slots = batch.slot_mapping.to(device)
        if kernels is not None:
            native = native_prefills = None
            if native_rows:
                rows, seqs, lens = (list(col) for col in zip(*native_rows, strict=True))
                nb = -(-max(lens) // block_size)
                native = NativeDecodes(
                    kernels,
                    torch.tensor(rows, dtype=torch.int64),
                    tables[torch.tensor(seqs, dtype=torch.int64), :nb].contiguous(),
                    torch.tensor(lens, dtype=torch.int64),
                )
            if native_chunks:
                seqs, starts_, qlens, lens = (list(col) for col in zip(*native_chunks, strict=True))
                nb = -(-max(lens) // block_size)
                native_prefills = NativePrefills(
                    kernels,
                    torch.tensor(starts_, dtype=torch.int64),
                    torch.tensor(qlens, dtype=torch.int64),
                    torch.tensor(lens, dtype=torch.int64),
                    tables[torch.tensor(seqs, dtype=torch.int64), :nb].contiguous(),
                )
            return cls(slots, [], [], False, native, native_prefills)
        groups = [
            _decode_group(g, starts, ctx, tables, block_size, device, dtype)
            for g in _split_by_length(decodes, ctx)
        ]
        decode_only = len(groups) == 1 and len(decodes) == len(ctx) and decodes == sorted(decodes)
        return cls(slots, groups, prefills, decode_only)


def _split_by_length(seqs: list[int], ctx: list[int]) -> list[list[int]]:
    """Sort decodes by context length and cut where a group would pad past 2x its shortest."""
    if not seqs:
        return []
    order = sorted(seqs, key=lambda s: ctx[s])
    groups: list[list[int]] = [[order[0]]]
    for s in order[1:]:
        if ctx[s] > 2 * ctx[groups[-1][0]] and len(groups) < MAX_DECODE_GROUPS:
            groups.append([s])
        else:
            groups[-1].append(s)
    if len(groups) == 1:
        return [sorted(seqs)]  # why: batch order lets a pure-decode step skip the row scatter
    return groups


def _decode_group(
    seqs: list[int],
    starts: list[int],
    ctx: list[int],
    tables: torch.Tensor,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> DecodeGroup:
    nb = -(-max(ctx[s] for s in seqs) // block_size)
    index = torch.tensor(seqs, dtype=torch.int64, device=device)
    lens = torch.tensor([ctx[s] for s in seqs], dtype=torch.int64, device=device)
    keys = torch.arange(nb * block_size, device=device)
    pad = (keys[None, :] >= lens[:, None])[:, None, None, :]
    mask = torch.zeros(pad.shape, dtype=dtype, device=device).masked_fill_(pad, float("-inf"))
    rows = torch.tensor([starts[s] for s in seqs], dtype=torch.int64, device=device)
    return DecodeGroup(rows, tables[index, :nb].reshape(-1), mask)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into `cache`, attend every query, return (T, H * D).

    q (T, H, D); k, v (T, Hkv, D); cache (2, num_blocks, block_size, Hkv, D), updated in place.
    A cache of another dtype than q (an fp16 KV cache) takes K/V rounded to its dtype; what is
    read back is widened to q's dtype for SDPA (the native kernels widen as they read).
    """
    t, h, d = q.shape
    hkv = k.shape[1]
    group = h // hkv
    n_blocks = cache.shape[1]
    cache.view(2, -1, hkv, d)[0].index_copy_(0, plan.slot_mapping, k.to(cache.dtype))
    cache.view(2, -1, hkv, d)[1].index_copy_(0, plan.slot_mapping, v.to(cache.dtype))
    blocks_flat = cache.view(2, n_blocks, -1)  # (2, N, bs * Hkv * D): one row per block
    out = None if plan.decode_only else torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    if plan.native is not None:
        assert out is not None
        nd = plan.native
        nd.kernels.paged_decode_attention(
            q, cache[0], cache[1], nd.block_tables, nd.context_lens, nd.rows, out, scale
        )
    if plan.native_prefills is not None:
        assert out is not None
        npf = plan.native_prefills
        npf.kernels.paged_prefill_attention(
            q,
            cache[0],
            cache[1],
            npf.block_tables,
            npf.starts,
            npf.query_lens,
            npf.context_lens,
            out,
            scale,
        )

    for dg in plan.decodes:
        sd = dg.rows.shape[0]
        # why index_select on flat block rows: ~3x faster than advanced indexing of a 6-D view
        # (2, Sd * nb, bs*Hkv*D) -> (2, Sd, Hkv, L, D), L = nb * bs
        kv = blocks_flat.index_select(1, dg.blocks).to(q.dtype)
        kv = kv.view(2, sd, -1, hkv, d).transpose(2, 3)
        qd = (q if out is None else q[dg.rows]).view(sd, hkv, group, d)  # GQA on query axis
        od = F.scaled_dot_product_attention(qd, kv[0], kv[1], attn_mask=dg.mask, scale=scale)
        if out is None:  # pure decode step in batch order: no scatter needed
            return od.reshape(t, h * d)
        out[dg.rows] = od.reshape(sd, h, d)
    assert out is not None

    # why [None]: SDPA takes its fused CPU (flash) kernel only for 4-D inputs; 3-D ones fall
    # back to the unfused math path, which materialises the full score matrix (~3x slower)
    for chunk in plan.prefills:
        qp = q[chunk.start : chunk.end].transpose(0, 1)  # (H, q, D)
        if chunk.blocks is None:
            kp = k[chunk.start : chunk.end].transpose(0, 1)  # (Hkv, q, D)
            vp = v[chunk.start : chunk.end].transpose(0, 1)
            op = F.scaled_dot_product_attention(
                qp[None], kp[None], vp[None], is_causal=True, scale=scale, enable_gqa=group > 1
            )[0]
        else:
            c = chunk.context_len
            kv = blocks_flat.index_select(1, chunk.blocks).to(q.dtype)
            kv = kv.view(2, -1, hkv, d)[:, :c].transpose(1, 2)  # (2, Hkv, c, D)
            op = F.scaled_dot_product_attention(
                qp[None],
                kv[0][None],
                kv[1][None],
                attn_mask=chunk.mask,
                scale=scale,
                enable_gqa=group > 1,
            )[0]
        out[chunk.start : chunk.end] = op.transpose(0, 1)
    return out.view(t, h * d)

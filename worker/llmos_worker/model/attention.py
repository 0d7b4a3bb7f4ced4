"""Paged attention over a block-structured KV cache, for one flat batch of mixed sequences.

`AttentionPlan.from_batch` turns a `ForwardBatch` into gather indices and masks ONCE per step;
every layer then reuses them. Single-token decodes are attended together: their K/V are gathered
block-wise by block table into a padded (S, Hkv, L, D) tensor with a length mask, and the GQA
query heads of one K/V head ride along the query axis, so one SDPA call serves all decodes
without repeating K/V. Prefill chunks (several tokens) are attended one sequence at a time with
a causal mask offset by the number of tokens already in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmos_worker.model.batch import ForwardBatch


@dataclass
class PrefillChunk:
    """One sequence computing `end - start` tokens with `context_len` K/V rows after this step."""

    start: int
    end: int
    context_len: int
    blocks: torch.Tensor | None  # (nb,) physical blocks to read; None: no cached prefix
    mask: torch.Tensor | None  # (q, context_len) additive: 0 or -inf; None: plain causal


@dataclass
class AttentionPlan:
    """Per-step indices shared by all layers."""

    slot_mapping: torch.Tensor  # (T,) flat KV slot of each new token
    decode_rows: torch.Tensor | None  # (Sd,) rows of the flat batch that are single-token decodes
    decode_blocks: torch.Tensor | None  # (Sd, nb) physical blocks of each decode sequence
    decode_mask: torch.Tensor | None  # (Sd, 1, 1, nb * block_size) additive: 0 or -inf
    prefills: list[PrefillChunk]

    @classmethod
    def from_batch(
        cls, batch: ForwardBatch, block_size: int, device: torch.device, dtype: torch.dtype
    ) -> AttentionPlan:
        starts = batch.query_start_loc.tolist()
        ctx = batch.context_lens.tolist()
        dec_seqs: list[int] = []
        dec_rows: list[int] = []
        prefills: list[PrefillChunk] = []
        tables = batch.block_tables.to(device)
        for s, c in enumerate(ctx):
            start, end = starts[s], starts[s + 1]
            q = end - start
            if q == 1 and c > 1:
                dec_seqs.append(s)
                dec_rows.append(start)
            elif q == c:  # why: whole prompt in this chunk -> K/V come straight from the step
                prefills.append(PrefillChunk(start, end, c, None, None))
            else:
                nb = -(-c // block_size)
                offset = c - q  # tokens already cached before this chunk
                key_pos = torch.arange(c, device=device)
                query_pos = torch.arange(offset, c, device=device)
                hidden = key_pos[None, :] > query_pos[:, None]  # (q, c): future keys
                mask = torch.zeros(hidden.shape, dtype=dtype, device=device)
                mask.masked_fill_(hidden, float("-inf"))
                prefills.append(PrefillChunk(start, end, c, tables[s, :nb], mask))
        plan = cls(batch.slot_mapping.to(device), None, None, None, prefills)
        if dec_seqs:
            lens = batch.context_lens[dec_seqs].to(device)
            nb = -(-max(ctx[s] for s in dec_seqs) // block_size)
            plan.decode_rows = torch.tensor(dec_rows, dtype=torch.int64, device=device)
            plan.decode_blocks = tables[dec_seqs, :nb]
            keys = torch.arange(nb * block_size, device=device)
            pad = (keys[None, :] >= lens[:, None])[:, None, None, :]
            plan.decode_mask = torch.zeros(pad.shape, dtype=dtype, device=device)
            plan.decode_mask.masked_fill_(pad, float("-inf"))
        return plan


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
    """
    t, h, d = q.shape
    hkv = k.shape[1]
    group = h // hkv
    k_cache, v_cache = cache[0], cache[1]  # (N, bs, Hkv, D) each
    k_cache.view(-1, hkv, d).index_copy_(0, plan.slot_mapping, k)
    v_cache.view(-1, hkv, d).index_copy_(0, plan.slot_mapping, v)

    if plan.decode_rows is not None:
        assert plan.decode_blocks is not None and plan.decode_mask is not None
        sd = plan.decode_rows.shape[0]
        # one gather for K and V: (2, Sd, nb, bs, Hkv, D) -> (2, Sd, Hkv, L, D), L = nb * bs
        # why index_select on flat block rows: ~3x faster than advanced indexing of a 6-D view
        kv = (cache.view(2, cache.shape[1], -1).index_select(1, plan.decode_blocks.view(-1))
              .view(2, sd, -1, hkv, d).transpose(2, 3))
        if sd == t:  # why: a pure decode step needs no row shuffling at all
            qd = q.view(sd, hkv, group, d)  # GQA group rides on the query axis
            od = F.scaled_dot_product_attention(qd, kv[0], kv[1], attn_mask=plan.decode_mask,
                                                scale=scale)
            return od.reshape(t, h * d)
        qd = q[plan.decode_rows].view(sd, hkv, group, d)
        od = F.scaled_dot_product_attention(qd, kv[0], kv[1], attn_mask=plan.decode_mask,
                                            scale=scale)
        out = torch.empty_like(q)
        out[plan.decode_rows] = od.reshape(sd, h, d)
    else:
        out = torch.empty_like(q)

    for chunk in plan.prefills:
        qp = q[chunk.start:chunk.end].transpose(0, 1)  # (H, q, D)
        if chunk.blocks is None:
            kp = k[chunk.start:chunk.end].transpose(0, 1)  # (Hkv, q, D)
            vp = v[chunk.start:chunk.end].transpose(0, 1)
            op = F.scaled_dot_product_attention(
                qp, kp, vp, is_causal=True, scale=scale, enable_gqa=group > 1
            )
        else:
            c = chunk.context_len
            kv = cache.view(2, cache.shape[1], -1).index_select(1, chunk.blocks)
            kv = kv.view(2, -1, hkv, d)[:, :c].transpose(1, 2)  # (2, Hkv, c, D)
            kp, vp = kv[0], kv[1]
            op = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=chunk.mask, scale=scale, enable_gqa=group > 1
            )
        out[chunk.start:chunk.end] = op.transpose(0, 1)
    return out.view(t, h * d)

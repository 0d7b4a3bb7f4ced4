"""The sampler: next tokens for a batch of logits rows, each row with its own parameters.

Work is batched over rows that need the same treatment: penalties (repetition on prompt and
output tokens, presence and frequency on output tokens, as in vLLM/OpenAI), banned tokens (eos
and stop ids before `min_tokens`), `logit_bias` (one scatter-add for every biased row), grammar
masks (`llmos_worker.engine.guided`: every constrained row's allowed tokens unpacked at once and
applied with one masked fill), temperature, min-p, top-k and top-p. Sampling uses the
"exponential race" `argmax(p / q)`, `q ~ Exp(1)`, which draws exactly from `p`; a row with a seed
draws its `q` from its own `torch.Generator`, so its tokens do not depend on what else is in the
batch. Logprobs are those of the model's raw distribution (before any processing), vLLM's default.
"""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from llmos_worker.engine.guided import allowed_mask
from llmos_worker.engine.outputs import TokenLogprob
from llmos_worker.engine.params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about the sequence behind one logits row."""

    params: SamplingParams
    prompt_token_ids: Seq[int]
    output_token_ids: Seq[int]
    generator: torch.Generator | None = None
    banned_token_ids: Collection[int] = field(default_factory=tuple)
    matcher: Any = None  # llguidance matcher: only the tokens it allows may be sampled


@dataclass
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None  # None unless the row asked for logprobs


def _needs_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _token_matrix(lists: list[Seq[int]], pad: int) -> torch.Tensor:
    width = max(1, max(len(x) for x in lists))
    return torch.tensor([[*x, *([pad] * (width - len(x)))] for x in lists], dtype=torch.long)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Penalised copy of `logits` (R, V) for `rows`; see the module docstring for the rules."""
    r, v = logits.shape
    out_ids = _token_matrix([row.output_token_ids for row in rows], v)  # (R, Lout), padded with V
    counts = torch.zeros(r, v + 1).scatter_add_(1, out_ids, torch.ones(out_ids.shape))[:, :v]
    prompt_ids = _token_matrix([row.prompt_token_ids for row in rows], v)
    in_prompt = torch.zeros(r, v + 1, dtype=torch.bool).scatter_(1, prompt_ids, True)[:, :v]
    seen = (counts > 0) | in_prompt
    rep = torch.tensor([row.params.repetition_penalty for row in rows]).unsqueeze(1)
    freq = torch.tensor([row.params.frequency_penalty for row in rows]).unsqueeze(1)
    pres = torch.tensor([row.params.presence_penalty for row in rows]).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - freq * counts - pres * (counts > 0).float()


def filter_logits(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Apply min-p, top-k and top-p to temperature-scaled logits `x` (R, V); masked = -inf."""
    neg_inf = torch.tensor(float("-inf"))
    min_p = torch.tensor([p.min_p for p in params]).unsqueeze(1)
    if bool((min_p > 0).any()):
        probs = torch.softmax(x, dim=-1)
        x = torch.where(probs < min_p * probs.amax(dim=-1, keepdim=True), neg_inf, x)
    top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
    if any(top_k):
        k_max = min(max(top_k), x.shape[1])
        kth = torch.topk(x, k_max, dim=-1).values  # (R, k_max), descending
        ks = torch.tensor([min(k, k_max) if k else k_max for k in top_k]) - 1
        threshold = kth.gather(1, ks.unsqueeze(1))
        active = torch.tensor([k > 0 for k in top_k]).unsqueeze(1)
        x = torch.where(active & (x < threshold), neg_inf, x)
    top_p = torch.tensor([p.top_p for p in params]).unsqueeze(1)
    if bool((top_p < 1.0).any()):
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
        drop_sorted = before >= top_p  # always keeps the most likely token
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        x = torch.where(drop, neg_inf, x)
    return x


class Sampler:
    """Batched sampling; unseeded rows share the engine's generator (seeded from the config)."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    @staticmethod
    def _constrain(logits: torch.Tensor, rows: list[SamplingRow], *, copied: bool) -> torch.Tensor:
        """`logit_bias` and grammar masks, batched over the rows that have them."""
        v = logits.shape[1]
        biased = [(i, r.params.logit_bias) for i, r in enumerate(rows) if r.params.logit_bias]
        guided = [i for i, r in enumerate(rows) if r.matcher is not None]
        if not biased and not guided:
            return logits
        if not copied:
            logits = logits.clone()
        if biased:
            # why: as OpenAI documents, -100 bans the token outright (a finite bias might not)
            entries = [
                (i, t, float("-inf") if b <= -100 else b)
                for i, bias in biased
                for t, b in bias.items()
                if t < v
            ]
            if entries:
                r_idx, c_idx, vals = zip(*entries, strict=True)
                logits.index_put_(
                    (torch.tensor(r_idx), torch.tensor(c_idx)),
                    torch.tensor(vals, dtype=logits.dtype),
                    accumulate=True,
                )
        if guided:
            allowed = allowed_mask([rows[i].matcher for i in guided], v, v)
            # why: a matcher that allows nothing (its grammar failed) must not leave the row all
            # -inf; the engine ends such a sequence when the token is refused
            allowed[~allowed.any(dim=1)] = True
            if len(guided) < len(rows):  # unconstrained rows allow everything
                full = torch.ones(len(rows), v, dtype=torch.bool)
                full[torch.tensor(guided)] = allowed
                allowed = full
            # one pass over the batch (measured faster than masked_fill_ on this CPU)
            logits = torch.where(allowed, logits, float("-inf"))
        return logits

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        """One token per row of `logits` (R, V) float32."""
        if len(rows) != logits.shape[0]:
            raise ValueError("one SamplingRow per logits row is required")
        if not rows:
            return []
        logits = logits.float()
        raw_logprobs: dict[int, torch.Tensor] = {}
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if lp_rows:
            lp = torch.log_softmax(logits[lp_rows], dim=-1)
            raw_logprobs = {i: lp[j] for j, i in enumerate(lp_rows)}

        pen_rows = [i for i, r in enumerate(rows) if _needs_penalty(r.params)]
        if pen_rows:
            logits = logits.clone()
            logits[pen_rows] = apply_penalties(logits[pen_rows], [rows[i] for i in pen_rows])
        banned = [(i, list(r.banned_token_ids)) for i, r in enumerate(rows) if r.banned_token_ids]
        if banned:
            if not pen_rows:
                logits = logits.clone()
            for i, ids in banned:
                logits[i, ids] = float("-inf")
        logits = self._constrain(logits, rows, copied=bool(pen_rows or banned))

        tokens = logits.argmax(dim=-1)  # (R,): the greedy choice for every row
        rand_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if rand_rows:
            params = [rows[i].params for i in rand_rows]
            temps = torch.tensor([p.temperature for p in params]).unsqueeze(1)
            x = filter_logits(logits[rand_rows] / temps, params)
            probs = torch.softmax(x, dim=-1)
            q = torch.empty_like(probs)
            shared = [j for j, i in enumerate(rand_rows) if rows[i].generator is None]
            if shared:
                q[shared] = torch.empty(len(shared), q.shape[1]).exponential_(
                    generator=self.generator
                )
            for j, i in enumerate(rand_rows):
                gen = rows[i].generator
                if gen is not None:
                    q[j].exponential_(generator=gen)
            tokens[rand_rows] = (probs / q).argmax(dim=-1)

        chosen = tokens.tolist()
        results: list[SampledToken] = []
        for i, (row, tok) in enumerate(zip(rows, chosen, strict=True)):
            lp_info: TokenLogprob | None = None
            if i in raw_logprobs:
                lp_row = raw_logprobs[i]
                k = row.params.logprobs or 0
                top: dict[int, float] = {}
                if k:
                    vals, top_ids = torch.topk(lp_row, k)
                    top = dict(zip(top_ids.tolist(), vals.tolist(), strict=True))
                lp_info = TokenLogprob(token_id=tok, logprob=float(lp_row[tok]), top=top)
            results.append(SampledToken(tok, lp_info))
        return results

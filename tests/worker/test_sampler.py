"""Sampler: greedy, seeds independent of batch composition, filters and penalties behave.

Distributional checks draw a few thousand samples from small fixed distributions with fixed
seeds; pure torch, about a second.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from llmos_worker.engine import Sampler, SamplingParams, SamplingRow
from llmos_worker.engine.sampler import apply_penalties

V = 8
LOGITS = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005]))


def row(seed: int | None = None, **kw: float | int) -> SamplingRow:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return SamplingRow(
        params=SamplingParams(**kw),
        prompt_token_ids=[],
        output_token_ids=[],  # type: ignore[arg-type]
        generator=gen,
    )


def draw(params: dict[str, float | int], n: int = 4000) -> Counter[int]:
    sampler = Sampler(seed=1)
    logits = LOGITS.expand(n, V).clone()
    return Counter(t.token_id for t in sampler.sample(logits, [row(**params) for _ in range(n)]))


def test_greedy_picks_the_argmax() -> None:
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    out = Sampler().sample(logits, [row(temperature=0.0) for _ in range(5)])
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()


def test_temperature_one_follows_the_distribution() -> None:
    counts = draw({"temperature": 1.0})
    probs = LOGITS.exp()
    for tok in range(4):
        assert abs(counts[tok] / 4000 - float(probs[tok])) < 0.03


def test_top_k_top_p_min_p_restrict_the_support() -> None:
    assert set(draw({"top_k": 2})) == {0, 1}
    # top_p 0.6: 0.4 alone is below, 0.4 + 0.25 covers it -> {0, 1}
    assert set(draw({"top_p": 0.6})) == {0, 1}
    # min_p 0.3: keep p >= 0.12 -> {0, 1, 2}
    assert set(draw({"min_p": 0.3})) == {0, 1, 2}
    # within the kept support, relative frequencies are preserved (0.4 : 0.25)
    c = draw({"top_k": 2})
    assert abs(c[0] / (c[0] + c[1]) - 0.4 / 0.65) < 0.03


def test_low_temperature_sharpens_high_flattens() -> None:
    cold, hot = draw({"temperature": 0.3}), draw({"temperature": 2.0})
    assert cold[0] > 3000 > hot[0]
    assert len(hot) == V


def test_seeded_rows_do_not_depend_on_batch_composition() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))

    def seq_of_draws(batch_extra: int, shared_seed: int) -> list[int]:
        sampler = Sampler(seed=shared_seed)
        mine = row(seed=1234, temperature=1.0)
        out = []
        for step in range(20):
            others = [row(temperature=1.0) for _ in range(batch_extra + step % 3)]
            batch = torch.cat([logits.expand(len(others), 50), logits])
            out.append(sampler.sample(batch, [*others, mine])[-1].token_id)
        return out

    a = seq_of_draws(0, shared_seed=1)
    assert a == seq_of_draws(5, shared_seed=2) == seq_of_draws(17, shared_seed=3)
    assert len(set(a)) > 3  # it does sample


def test_penalties() -> None:
    logits = torch.tensor([[2.0, -1.0, 1.0, 0.5]])
    r = SamplingRow(
        params=SamplingParams(repetition_penalty=2.0), prompt_token_ids=[0], output_token_ids=[1]
    )
    assert apply_penalties(logits, [r]).tolist() == [[1.0, -2.0, 1.0, 0.5]]
    r = SamplingRow(
        params=SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        prompt_token_ids=[3],
        output_token_ids=[2, 2, 0],
    )
    # token 2 seen twice: -2*0.5 - 0.25; token 0 once: -0.5 - 0.25; prompt-only token 3 untouched
    assert apply_penalties(logits, [r]).tolist() == [[1.25, -1.0, -0.25, 0.5]]
    # through the sampler: a repeated greedy token loses its place
    out = Sampler().sample(
        torch.tensor([[1.0, 0.9]]),
        [
            SamplingRow(
                params=SamplingParams(temperature=0.0, frequency_penalty=1.0),
                prompt_token_ids=[],
                output_token_ids=[0],
            )
        ],
    )
    assert out[0].token_id == 1


def test_banned_tokens_and_logprobs() -> None:
    r = SamplingRow(
        params=SamplingParams(temperature=0.0, logprobs=2),
        prompt_token_ids=[],
        output_token_ids=[],
        banned_token_ids=[0],
    )
    out = Sampler().sample(LOGITS.unsqueeze(0).clone(), [r])[0]
    assert out.token_id == 1
    assert out.logprob is not None
    # logprobs are the model's raw distribution, not the banned/penalised one
    assert out.logprob.logprob == pytest.approx(math.log(0.25), abs=1e-5)
    assert list(out.logprob.top) == [0, 1]
    assert sum(math.exp(v) for v in out.logprob.top.values()) == pytest.approx(0.65, abs=1e-5)

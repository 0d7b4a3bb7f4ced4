"""Prompt logprobs (what `echo` + `logprobs` report): each prompt token scored by the model.

The reference for token j is the engine itself run on the prompt's first j tokens with that
token forced by `logit_bias`: the reported logprob is the raw distribution's, so it must equal
what prompt scoring found at position j - 1. Chunked prefill, a warm prefix cache and a batch
neighbour must not change the scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmos_worker.engine import EngineConfig, LLMEngine, SamplingParams
from llmos_worker.model import load_model

PROMPT = [(311 * j) % 30000 + 200 for j in range(23)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir))


def engine_for(tiny: Any, **cfg: Any) -> LLMEngine:
    cfg.setdefault("kv_cache_memory_bytes", 4 * 2**20)
    cfg.setdefault("block_size", 4)
    return LLMEngine(tiny, EngineConfig(**cfg))


def scored(engine: LLMEngine, prompt: list[int], k: int = 2) -> list[Any]:
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k)
    (out,) = engine.generate([prompt], params)
    assert out.prompt_logprobs is not None
    return out.prompt_logprobs


def test_each_prompt_token_scored_as_the_model_predicts_it(tiny: Any) -> None:
    engine = engine_for(tiny)
    lps = scored(engine, PROMPT)
    assert len(lps) == len(PROMPT) and lps[0] is None
    for j in (1, 5, 12, 22):
        forced = SamplingParams(
            max_tokens=1, temperature=0, logprobs=2, logit_bias={PROMPT[j]: 100.0}
        )
        (ref,) = engine.generate([PROMPT[:j]], forced)
        (tok,) = ref.outputs[0].logprobs or []
        assert tok.token_id == PROMPT[j] == lps[j].token_id
        assert lps[j].logprob == pytest.approx(tok.logprob, abs=1e-4)
        assert list(lps[j].top) == list(tok.top)


def test_chunked_prefill_cache_and_neighbours_do_not_change_scores(tiny: Any) -> None:
    whole = scored(engine_for(tiny), PROMPT)
    engine = engine_for(tiny, max_num_batched_tokens=8, enable_prefix_caching=True)
    engine.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0))  # warms the cache
    other = SamplingParams(max_tokens=3, temperature=0)
    scoring = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    outs = engine.generate([PROMPT[:9], PROMPT, PROMPT[3:]], [other, scoring, other])
    chunked = outs[1].prompt_logprobs
    assert chunked is not None and len(chunked) == len(PROMPT)
    for a, b in zip(whole[1:], chunked[1:], strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert outs[0].prompt_logprobs is None


def test_scored_requests_leave_no_state(tiny: Any) -> None:
    engine = engine_for(tiny)
    scored(engine, PROMPT)
    assert engine.prompt_logprobs == {}

"""echo (with prompt logprobs), best_of, continuous usage and n > 1 streams, via `openai`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.worker.server_harness import InProcessServer, engine_factory

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[InProcessServer]:
    with InProcessServer(engine_factory(str(tiny_model_dir))) as srv:
        yield srv


@pytest.fixture
def client(server: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_echo_max_tokens_zero_scores_the_prompt(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    # what lm-eval-harness sends for log-likelihood
    resp = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    (choice,) = resp.choices
    assert choice.text == PROMPT
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    n = len(server.state.tokenizer.encode(PROMPT))
    assert len(lp.tokens) == n == resp.usage.prompt_tokens  # type: ignore[union-attr]
    assert resp.usage.completion_tokens == 0  # type: ignore[union-attr]
    assert "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:]), lp.token_logprobs
    assert all(t is not None and len(t) >= 1 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]


def test_echo_with_generation_puts_the_prompt_first(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    plain = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0
    )
    echo = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0, echo=True
    )
    assert echo.choices[0].text == PROMPT + plain.choices[0].text
    lp, gen = echo.choices[0].logprobs, plain.choices[0].logprobs
    assert lp is not None and gen is not None and lp.token_logprobs and gen.token_logprobs
    assert lp.token_logprobs[-4:] == pytest.approx(gen.token_logprobs)
    assert lp.text_offset[-4] == len(PROMPT)  # type: ignore[index]

    stream = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == echo.choices[0].text


def test_best_of_returns_the_most_likely_candidate(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    kw = {"model": server.model, "prompt": PROMPT, "max_tokens": 5, "temperature": 1.0, "seed": 7}
    every = client.completions.create(n=4, logprobs=0, **kw)  # type: ignore[arg-type]
    totals = [math.fsum(c.logprobs.token_logprobs) for c in every.choices]  # type: ignore[arg-type,union-attr]
    best = client.completions.create(best_of=4, **kw)  # type: ignore[arg-type]
    (choice,) = best.choices
    assert choice.index == 0 and choice.logprobs is None
    assert choice.text == every.choices[totals.index(max(totals))].text
    assert best.usage.completion_tokens == 20  # type: ignore[union-attr]  # all candidates


def test_n_streams_one_choice_per_chunk_with_continuous_usage(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "hi"}],
        n=3,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
    )
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert all(len(c.choices) == 1 for c in with_choices)
    assert {c.choices[0].index for c in with_choices} == {0, 1, 2}
    seen = [c.usage.completion_tokens for c in with_choices if c.usage is not None]
    assert seen == sorted(seen) and len(seen) == len(with_choices)
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None and final.usage.completion_tokens == 12

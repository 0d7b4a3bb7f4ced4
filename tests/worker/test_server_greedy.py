"""Greedy chat completions over HTTP equal the engine's own outputs (the real SmolLM2 model).

The engine's tests compare the engine with Hugging Face; this closes the chain: the server's
chat template, request conversion, streaming and response assembly add nothing and drop nothing.
One engine serves both sides: first offline (`generate`), then behind the HTTP server.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from llmos_worker.engine.config import EngineConfig
from llmos_worker.engine.engine import LLMEngine
from llmos_worker.engine.outputs import RequestOutput
from llmos_worker.engine.params import SamplingParams
from tests.worker.server_harness import InProcessServer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colours."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Count from one to five."},
    ],
]
MAX_TOKENS = 24

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[InProcessServer, list[RequestOutput]]]:
    engine = LLMEngine.from_source(
        "builtin://smollm2-135m-instruct",
        EngineConfig(kv_cache_memory_bytes=64 * 1024 * 1024, max_num_seqs=8),
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    expected = [
        engine.generate(
            [engine.tokenizer.apply_chat_template(c, add_generation_prompt=True)], params
        )[0]
        for c in CONVERSATIONS
    ]
    with InProcessServer(lambda: engine) as srv:
        yield srv, expected


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_greedy_chat_over_http_equals_engine(
    served: tuple[InProcessServer, list[RequestOutput]], index: int
) -> None:
    server, expected = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    want = expected[index].outputs[0]
    assert want.text  # the model says something

    resp = client.chat.completions.create(
        model=server.model,
        messages=CONVERSATIONS[index],  # type: ignore[arg-type]
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert resp.choices[0].message.content == want.text
    assert resp.choices[0].finish_reason == want.finish_reason
    assert resp.usage is not None
    assert resp.usage.completion_tokens == len(want.token_ids)
    assert resp.usage.prompt_tokens == len(expected[index].prompt_token_ids)

    stream = client.chat.completions.create(
        model=server.model,
        messages=CONVERSATIONS[index],  # type: ignore[arg-type]
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text

"""The official `openai` client, unchanged, against a real server on loopback (tiny model).

Covers chat and text completions, SSE streaming (with usage), n > 1, seed reproducibility,
logprobs shapes, batched and token-id prompts, and the client's error classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.worker.server_harness import InProcessServer, engine_factory

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[InProcessServer]:
    with InProcessServer(engine_factory(str(tiny_model_dir))) as srv:
        yield srv


@pytest.fixture
def client(server: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client: openai.OpenAI, server: InProcessServer) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]


def test_chat_completion(client: openai.OpenAI, server: InProcessServer) -> None:
    resp = client.chat.completions.create(
        model=server.model,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=6,
        temperature=0,
    )
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == server.model
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None
    assert resp.usage.completion_tokens <= 6
    assert resp.usage.prompt_tokens > 5  # the chat template adds role markers
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_max_completion_tokens_bounds_chat(client: openai.OpenAI, server: InProcessServer) -> None:
    resp = client.chat.completions.create(
        model=server.model,
        messages=CHAT,  # type: ignore[arg-type]
        max_completion_tokens=3,
        temperature=0,
    )
    assert resp.usage is not None and resp.usage.completion_tokens == 3
    assert resp.choices[0].finish_reason == "length"


def test_text_completion(client: openai.OpenAI, server: InProcessServer) -> None:
    resp = client.completions.create(
        model=server.model, prompt="Hello", max_tokens=5, temperature=0
    )
    assert resp.object == "text_completion"
    (choice,) = resp.choices
    assert choice.finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 5


def test_batched_and_token_id_prompts(client: openai.OpenAI, server: InProcessServer) -> None:
    resp = client.completions.create(
        model=server.model, prompt=["Hello", "Good morning"], max_tokens=4, temperature=0, n=2
    )
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    assert resp.usage is not None and resp.usage.completion_tokens == 16
    by_index = {c.index: c.text for c in resp.choices}
    assert by_index[0] == by_index[1]  # greedy: both completions of one prompt agree
    ids = client.completions.create(
        model=server.model, prompt=[[1, 2, 3], [4, 5]], max_tokens=2, temperature=0
    )
    assert len(ids.choices) == 2
    assert ids.usage is not None and ids.usage.prompt_tokens == 5


def test_streaming_chat_equals_non_streaming(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    whole = client.chat.completions.create(
        model=server.model,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
    )
    stream = client.chat.completions.create(
        model=server.model,
        messages=CHAT,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_streaming_completion_with_n(client: openai.OpenAI, server: InProcessServer) -> None:
    stream = client.completions.create(
        model=server.model,
        prompt="Once upon",
        max_tokens=6,
        temperature=0.8,
        seed=5,
        n=3,
        stream=True,
    )
    texts: dict[int, str] = {}
    finished: set[int] = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    whole = client.completions.create(
        model=server.model, prompt="Once upon", max_tokens=6, temperature=0.8, seed=5, n=3
    )
    assert {c.index: c.text for c in whole.choices} == texts


def test_streamed_batch_matches_whole_with_indices_and_logprob_offsets(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    # two prompts x n=2: choice index = prompt index * n + completion index, as OpenAI batches
    args: dict[str, Any] = dict(
        model=server.model, prompt=["Hello", "Once upon"], max_tokens=6, temperature=0, n=2
    )
    whole = client.completions.create(**args, logprobs=1)
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    offsets: dict[int, list[int]] = {}
    for chunk in client.completions.create(**args, logprobs=1, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.logprobs is not None:
                tokens.setdefault(c.index, []).extend(c.logprobs.tokens or [])
                offsets.setdefault(c.index, []).extend(c.logprobs.text_offset or [])
    assert sorted(texts) == [0, 1, 2, 3]
    for c in whole.choices:
        assert texts[c.index] == c.text
        assert c.logprobs is not None
        # offsets continue across chunks: the same as the whole response's
        assert tokens[c.index] == c.logprobs.tokens
        assert offsets[c.index] == c.logprobs.text_offset


def test_streamed_chat_logprobs_match_whole(client: openai.OpenAI, server: InProcessServer) -> None:
    args: dict[str, Any] = dict(
        model=server.model, messages=CHAT, max_tokens=6, temperature=0, logprobs=True
    )
    whole = client.chat.completions.create(**args)
    streamed = [
        entry.token
        for chunk in client.chat.completions.create(**args, stream=True)
        for c in chunk.choices
        if c.logprobs is not None and c.logprobs.content
        for entry in c.logprobs.content
    ]
    content = whole.choices[0].logprobs
    assert content is not None and content.content is not None
    assert streamed == [e.token for e in content.content]


def test_n_greater_than_one_chat(client: openai.OpenAI, server: InProcessServer) -> None:
    resp = client.chat.completions.create(
        model=server.model,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=8,
        n=4,
        temperature=1.0,
        seed=11,
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert len({c.message.content for c in resp.choices}) > 1  # sampled, not copies
    assert resp.usage is not None and 4 <= resp.usage.completion_tokens <= 32


def test_seed_reproducibility(client: openai.OpenAI, server: InProcessServer) -> None:
    def sample(seed: int) -> str | None:
        resp = client.chat.completions.create(
            model=server.model,
            messages=CHAT,
            max_tokens=16,  # type: ignore[arg-type]
            temperature=1.0,
            top_p=0.95,
            seed=seed,
        )
        return resp.choices[0].message.content

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_chat_logprobs_shape(client: openai.OpenAI, server: InProcessServer) -> None:
    resp = client.chat.completions.create(
        model=server.model,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    logprobs = resp.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == 4
    for entry in logprobs.content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in logprobs.content) == resp.choices[0].message.content


def test_completion_logprobs_shape(client: openai.OpenAI, server: InProcessServer) -> None:
    resp = client.completions.create(
        model=server.model, prompt="Hello", max_tokens=4, temperature=0, logprobs=2
    )
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == resp.choices[0].text


def test_stop_string_is_honoured_in_stream_and_whole(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    base = client.completions.create(
        model=server.model, prompt="Hello", max_tokens=10, temperature=0
    )
    text = base.choices[0].text
    stop = text[3:6]  # a string the greedy continuation is known to contain
    if not stop.strip():
        pytest.fail(f"greedy continuation too short to pick a stop string: {text!r}")
    whole = client.completions.create(
        model=server.model, prompt="Hello", max_tokens=10, temperature=0, stop=[stop]
    )
    assert whole.choices[0].finish_reason == "stop"
    assert stop not in whole.choices[0].text
    assert text.startswith(whole.choices[0].text)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=server.model,
            prompt="Hello",
            max_tokens=10,
            temperature=0,
            stop=[stop],
            stream=True,
        )
        if c.choices
    )
    assert streamed == whole.choices[0].text


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (
            lambda c, m: c.chat.completions.create(model=m, messages=[], max_tokens=1),
            openai.BadRequestError,
        ),
        (
            lambda c, m: c.chat.completions.create(model="no-such-model", messages=CHAT),
            openai.NotFoundError,
        ),
        (
            lambda c, m: c.completions.create(model=m, prompt="x", temperature=5.0),
            openai.BadRequestError,
        ),
        (
            lambda c, m: c.completions.create(model=m, prompt="x", max_tokens=10**6),
            openai.BadRequestError,
        ),
        (
            lambda c, m: c.completions.create(model=m, prompt=[10**9], max_tokens=1),
            openai.BadRequestError,
        ),
        (lambda c, m: c.completions.create(model=m, prompt="x", n=1000), openai.BadRequestError),
        (
            lambda c, m: c.chat.completions.create(model=m, messages=CHAT, top_logprobs=3),
            openai.BadRequestError,
        ),
    ],
)
def test_openai_error_classes(
    client: openai.OpenAI, server: InProcessServer, call: object, error: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error) as info:
        call(client, server.model)  # type: ignore[operator]
    body = info.value.body
    assert isinstance(body, dict) and set(body) >= {"message", "type", "param", "code"}


def test_context_length_error_names_both_numbers(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt="hello " * 100, max_tokens=10_000)
    assert "10000" in info.value.message
    assert str(server.state.front.engine.max_model_len) in info.value.message  # type: ignore[union-attr]


def test_overload_is_429_with_retry_after(tiny_model_dir: Path) -> None:
    with InProcessServer(engine_factory(str(tiny_model_dir)), max_waiting_requests=0) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=srv.model, prompt="x", max_tokens=1)
        assert info.value.response.headers["retry-after"] == "1"
        assert httpx.get(srv.url + "/ready").status_code == 200

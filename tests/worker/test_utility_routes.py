"""`/tokenize`, `/detokenize` and `/v1/models/{id}` (vLLM's and OpenAI's shapes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.worker.server_harness import InProcessServer, engine_factory


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[InProcessServer]:
    with InProcessServer(engine_factory(str(tiny_model_dir))) as srv:
        yield srv


def test_tokenize_detokenize_round_trip(server: InProcessServer) -> None:
    tok = httpx.post(
        server.url + "/tokenize",
        json={"model": server.model, "prompt": "Hello world", "return_token_strs": True},
    )
    assert tok.status_code == 200, tok.text
    body = tok.json()
    assert body["tokens"] == server.state.tokenizer.encode("Hello world", add_special_tokens=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
    assert len(body["token_strs"]) == body["count"]
    back = httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"]})
    assert back.json() == {"prompt": "Hello world"}


def test_tokenize_messages_matches_the_chat_prompt(server: InProcessServer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    tok = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    resp = client.chat.completions.create(model=server.model, messages=messages, max_tokens=1)  # type: ignore[arg-type]
    assert resp.usage is not None and tok["count"] == resp.usage.prompt_tokens


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
    ],
)
def test_bad_utility_bodies_are_400s(
    server: InProcessServer, path: str, body: dict[str, object], param: str
) -> None:
    resp = httpx.post(server.url + path, json=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param


def test_model_by_id(server: InProcessServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    card = client.models.retrieve(server.model)
    assert card.id == server.model and card.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]

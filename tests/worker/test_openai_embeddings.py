"""`POST /v1/embeddings` through the openai client: float and base64 (the client's default, which
it decodes) give the same vectors, equal to Hugging Face's mean-pooled, normalized
`last_hidden_state`; batches of strings and token ids keep their order and count their tokens;
bad bodies are 400s naming the field, an unknown model a 404."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.worker.server_harness import InProcessServer, engine_factory

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Bonjour", "naïve café ☕ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[InProcessServer]:
    with InProcessServer(engine_factory(str(tiny_model_dir))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def reference(tiny_model_dir: Path, ids: list[int]) -> list[float]:
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.inference_mode():
        hidden = hf(torch.tensor([ids])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).tolist()


def test_embeddings_match_transformers_in_both_encodings(
    server: InProcessServer, client: openai.OpenAI, tiny_model_dir: Path
) -> None:
    as_float = client.embeddings.create(model=server.model, input=TEXTS, encoding_format="float")
    as_b64 = client.embeddings.create(model=server.model, input=TEXTS)  # the client asks base64
    encode = server.state.tokenizer.encode
    ids = [encode(t, add_special_tokens=True) for t in TEXTS]
    assert [d.index for d in as_float.data] == [0, 1, 2]
    assert as_float.model == server.model and as_float.object == "list"
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == sum(map(len, ids))
    for i, item in enumerate(as_float.data):
        got = torch.tensor(item.embedding)
        torch.testing.assert_close(got, torch.tensor(as_b64.data[i].embedding), atol=0, rtol=0)
        want = torch.tensor(reference(tiny_model_dir, ids[i]))
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
        assert torch.linalg.vector_norm(got).item() == pytest.approx(1.0, abs=1e-5)


def test_token_id_inputs_and_truncation(server: InProcessServer, client: openai.OpenAI) -> None:
    encode = server.state.tokenizer.encode
    ids = [encode(t, add_special_tokens=True) for t in TEXTS]
    by_ids = client.embeddings.create(model=server.model, input=ids, encoding_format="float")
    by_text = client.embeddings.create(model=server.model, input=TEXTS, encoding_format="float")
    for a, b in zip(by_ids.data, by_text.data, strict=True):
        torch.testing.assert_close(torch.tensor(a.embedding), torch.tensor(b.embedding))
    raw = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": server.model, "input": ids[0], "truncate_prompt_tokens": 3},
    ).json()
    tail = client.embeddings.create(
        model=server.model, input=[ids[0][-3:]], encoding_format="float"
    )
    assert raw["usage"]["prompt_tokens"] == 3
    torch.testing.assert_close(
        torch.tensor(raw["data"][0]["embedding"]), torch.tensor(tail.data[0].embedding)
    )


def test_a_batch_larger_than_one_engine_wave_keeps_its_order(
    server: InProcessServer, client: openai.OpenAI
) -> None:
    words = [f"item number {i}" for i in range(70)]  # two waves of the engine queue
    many = client.embeddings.create(model=server.model, input=words, encoding_format="float")
    assert [d.index for d in many.data] == list(range(70))
    one = client.embeddings.create(model=server.model, input=words[65], encoding_format="float")
    torch.testing.assert_close(
        torch.tensor(many.data[65].embedding), torch.tensor(one.data[0].embedding)
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": [1, "a"]}, "input"),
        ({"input": [[1, 2], [10**9]]}, "input"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "dimensions": 3}, "dimensions"),
        ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"input": "a " * 5000}, "input"),
        ({}, "input"),
    ],
)
def test_bad_embedding_bodies_are_400s(
    server: InProcessServer, body: dict[str, object], param: str
) -> None:
    resp = httpx.post(server.url + "/v1/embeddings", json={"model": server.model, **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_unknown_model_is_a_404(server: InProcessServer) -> None:
    resp = httpx.post(server.url + "/v1/embeddings", json={"model": "nope", "input": "a"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"

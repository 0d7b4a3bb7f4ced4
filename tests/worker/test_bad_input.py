"""Malformed requests: every one is a 4xx in OpenAI's error shape, and the server stays ready.

Each case is sent raw (httpx) to a real server on loopback, so malformed JSON, wrong content
types, wrong methods and oversized bodies reach the server exactly as a broken client sends them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.worker.server_harness import InProcessServer, engine_factory

MODEL = "tiny"  # --served-model-name
CHAT = [{"role": "user", "content": "hi"}]
MAX_BODY = 64 * 1024


@dataclass
class Case:
    id: str
    body: Any  # dict -> JSON-encoded; bytes -> sent as is
    status: int = 400
    param: str | None = None
    path: str = "/v1/completions"
    method: str = "POST"
    headers: dict[str, str] | None = None


def comp(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": CHAT, "max_tokens": 2, **fields}


CASES = [
    Case("malformed-json", b'{"model": "tiny", "prompt": '),
    Case("empty-body", b""),
    Case("json-array-body", b"[1, 2]"),
    Case("json-string-body", b'"hello"'),
    Case("invalid-utf8", b'{"model": "\xff\xfe"}'),
    Case("deeply-nested", b"[" * 30_000 + b"]" * 30_000),
    Case("text-content-type", comp(), 415, headers={"content-type": "text/plain"}),
    Case(
        "form-content-type",
        comp(),
        415,
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    Case("body-too-large", comp(prompt="a" * (MAX_BODY + 10)), 413),
    Case(
        "known-unsupported-field",
        chat(audio={"voice": "alloy", "format": "wav"}),
        param="audio",
        path="/v1/chat/completions",
    ),
    Case("missing-model", {"prompt": "x"}, param="model"),
    Case("model-not-string", comp(model=123), param="model"),
    Case("unknown-model", comp(model="gpt-9"), 404, param="model"),
    Case("missing-prompt", {"model": MODEL}, param="prompt"),
    Case("prompt-object", comp(prompt={"a": 1}), param="prompt"),
    Case("prompt-mixed-list", comp(prompt=[1, "a"]), param="prompt"),
    Case("prompt-bool-ids", comp(prompt=[True, False]), param="prompt"),
    Case("prompt-empty-list", comp(prompt=[]), param="prompt"),
    Case("prompt-empty-string", comp(prompt=""), param="prompt"),
    Case("prompt-too-many", comp(prompt=["a"] * 65), param="prompt"),
    Case("token-id-out-of-vocab", comp(prompt=[1, 10**9]), param="prompt"),
    Case("token-id-negative", comp(prompt=[-1]), param="prompt"),
    Case("prompt-plus-max-tokens-over-context", comp(max_tokens=10**6)),
    Case("n-as-string", comp(n="2"), param="n"),
    Case("n-zero", comp(n=0), param="n"),
    Case("n-too-large", comp(n=1000), param="n"),
    Case("max-tokens-zero", comp(max_tokens=0), param="max_tokens"),
    Case("max-tokens-negative", comp(max_tokens=-5), param="max_tokens"),
    Case("max-tokens-float", comp(max_tokens=1.5), param="max_tokens"),
    Case("max-tokens-string", comp(max_tokens="10"), param="max_tokens"),
    Case("temperature-negative", comp(temperature=-1), param="temperature"),
    Case("temperature-string", comp(temperature="hot"), param="temperature"),
    Case(
        "temperature-nan",
        b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
        param="temperature",
    ),
    Case("top-p-zero", comp(top_p=0), param="top_p"),
    Case("top-p-above-one", comp(top_p=1.5), param="top_p"),
    Case("top-k-below-minus-one", comp(top_k=-5), param="top_k"),
    Case("min-p-above-one", comp(min_p=2.0), param="min_p"),
    Case("presence-penalty-out-of-range", comp(presence_penalty=3), param="presence_penalty"),
    Case("frequency-penalty-out-of-range", comp(frequency_penalty=-3), param="frequency_penalty"),
    Case("stop-int", comp(stop=5), param="stop"),
    Case("stop-too-many", comp(stop=[f"s{i}" for i in range(17)]), param="stop"),
    Case("stop-empty-string", comp(stop=[""]), param="stop"),
    Case("stream-not-bool", comp(stream="yes"), param="stream"),
    Case(
        "stream-options-without-stream",
        comp(stream_options={"include_usage": True}),
        param="stream_options",
    ),
    Case("seed-string", comp(seed="x"), param="seed"),
    Case("seed-too-large", comp(seed=2**70), param="seed"),
    Case("logprobs-too-many", comp(logprobs=50), param="logprobs"),
    Case("suffix-without-fim-tokens", comp(suffix="end"), param="suffix"),
    Case("best-of-below-n", comp(n=3, best_of=2), param="best_of"),
    Case("best-of-streamed", comp(best_of=3, stream=True), param="best_of"),
    Case("best-of-too-many", comp(best_of=50), param="best_of"),
    Case("max-tokens-zero-without-echo", comp(max_tokens=0), param="max_tokens"),
    Case("user-not-string", comp(user=5), param="user"),
    Case("chat-missing-messages", {"model": MODEL}, param="messages", path="/v1/chat/completions"),
    Case("chat-empty-messages", chat(messages=[]), param="messages", path="/v1/chat/completions"),
    Case(
        "chat-messages-not-list", chat(messages="hi"), param="messages", path="/v1/chat/completions"
    ),
    Case(
        "chat-bad-role",
        chat(messages=[{"role": "wizard", "content": "x"}]),
        param="messages.0.role",
        path="/v1/chat/completions",
    ),
    Case(
        "chat-content-int",
        chat(messages=[{"role": "user", "content": 5}]),
        param="messages.0.content",
        path="/v1/chat/completions",
    ),
    Case(
        "chat-missing-content",
        chat(messages=[{"role": "user"}]),
        param="messages.0.content",
        path="/v1/chat/completions",
    ),
    Case(
        "chat-image-part",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ]
        ),
        path="/v1/chat/completions",
    ),
    Case(
        "chat-top-logprobs-without-logprobs",
        chat(top_logprobs=2),
        param="top_logprobs",
        path="/v1/chat/completions",
    ),
    Case(
        "chat-top-logprobs-too-many",
        chat(logprobs=True, top_logprobs=30),
        param="top_logprobs",
        path="/v1/chat/completions",
    ),
    Case(
        "chat-max-completion-tokens-zero",
        chat(max_completion_tokens=0),
        param="max_completion_tokens",
        path="/v1/chat/completions",
    ),
    Case("chat-logprobs-not-bool", chat(logprobs=3), param="logprobs", path="/v1/chat/completions"),
    Case("get-on-post-route", None, 405, method="GET"),
    Case("unknown-route", comp(), 404, path="/v1/frobnicate"),
    Case("post-on-models", {}, 405, path="/v1/models"),
]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[InProcessServer]:
    with InProcessServer(
        engine_factory(str(tiny_model_dir)), max_body_bytes=MAX_BODY, served_model_name=MODEL
    ) as srv:
        assert srv.model == MODEL
        yield srv


def test_there_are_at_least_30_distinct_cases() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_is_4xx_in_openai_shape(server: InProcessServer, case: Case) -> None:
    content = case.body if isinstance(case.body, bytes | None) else json.dumps(case.body).encode()
    headers = {"content-type": "application/json", **(case.headers or {})}
    resp = httpx.request(
        case.method, server.url + case.path, content=content, headers=headers, timeout=30
    )
    assert resp.status_code == case.status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if case.param is not None:
        assert error["param"] == case.param, error


def test_server_still_ready_and_idle_after_bad_input(server: InProcessServer) -> None:
    for case in CASES[:5]:  # also after the suite ran in any order
        httpx.post(server.url + case.path, content=b"{", headers={"content-type": "x/y"})
    assert httpx.get(server.url + "/ready").status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    ok = httpx.post(server.url + "/v1/completions", json=comp(), timeout=30)
    assert ok.status_code == 200, ok.text
    front = server.state.front
    assert front is not None and front.num_inflight == 0

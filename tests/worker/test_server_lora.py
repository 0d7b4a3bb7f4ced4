"""LoRA over HTTP: the request's `model` picks an adapter, vLLM's load/unload routes, errors.

The tiny model is served with one adapter given at start-up; another is loaded at run time. A
completion naming an adapter equals the engine's output for that adapter (itself checked
against PEFT in test_lora.py); `/v1/models` lists adapters with their parent; an unknown model
is a 404 in OpenAI's shape; a malformed or oversized adapter is a 400 and the server keeps
serving; without `allow_runtime_lora_updating` the routes answer 403.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from llmos_worker.engine import LLMEngine, SamplingParams
from llmos_worker.engine.adapters import AdapterNotFoundError
from llmos_worker.model import load_model
from llmos_worker.server.errors import to_http_error
from tests.worker.lora_util import make_adapter
from tests.worker.server_harness import TINY_ENGINE, InProcessServer

PROMPT = [1, 500, 600, 700, 800, 900]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("server-lora")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    first = make_adapter(base, root / "one", seed=11)
    make_adapter(first.unload(), root / "two", seed=12, r=2, alpha=2)
    return [str(root / "one"), str(root / "two")]


def engine(tiny_model_dir: Path, adapter_dirs: list[str], **lora: Any) -> LLMEngine:
    config = dataclasses.replace(
        TINY_ENGINE, lora_modules={"one": adapter_dirs[0]}, max_lora_rank=8, **lora
    )
    return LLMEngine(load_model(str(tiny_model_dir)), config)


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, adapter_dirs: list[str]) -> Iterator[InProcessServer]:
    eng = engine(tiny_model_dir, adapter_dirs, allow_runtime_lora_updating=True)
    with InProcessServer(lambda: eng) as srv:
        yield srv


def expected(tiny_model_dir: Path, adapter_dirs: list[str], lora: str | None) -> list[int]:
    eng = engine(tiny_model_dir, adapter_dirs, max_loras=1)
    if lora == "two":
        assert eng.adapters is not None
        eng.adapters.register(eng.adapters.read("two", adapter_dirs[1]))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, lora_name=lora)
    return eng.generate([PROMPT], params)[0].outputs[0].token_ids


def complete(srv: InProcessServer, model: str) -> httpx.Response:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    return httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)


def test_model_field_selects_adapter_and_routes_load_unload(
    served: InProcessServer, tiny_model_dir: Path, adapter_dirs: list[str]
) -> None:
    base_name = served.state.model_name
    base = complete(served, base_name)
    one = complete(served, "one")
    assert base.status_code == one.status_code == 200
    assert base.json()["choices"][0]["text"] != one.json()["choices"][0]["text"]
    assert (base.json()["model"], one.json()["model"]) == (base_name, "one")  # as vLLM echoes
    streamed = httpx.post(
        f"{served.url}/v1/completions",
        json={"model": "one", "prompt": PROMPT, "max_tokens": 4, "stream": True},
        timeout=60,
    )
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line[6:7] == "{"]
    assert events and {e["model"] for e in events} == {"one"}
    tok = served.state.front.engine.tokenizer  # type: ignore[union-attr]
    assert one.json()["choices"][0]["text"] == tok.decode(
        expected(tiny_model_dir, adapter_dirs, "one")
    )
    assert base.json()["choices"][0]["text"] == tok.decode(
        expected(tiny_model_dir, adapter_dirs, None)
    )

    missing = complete(served, "two")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"

    url = served.url
    loaded = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "two", "lora_path": adapter_dirs[1]}
    )
    assert loaded.status_code == 200, loaded.text
    two = complete(served, "two")
    assert two.status_code == 200
    assert two.json()["choices"][0]["text"] == tok.decode(
        expected(tiny_model_dir, adapter_dirs, "two")
    )
    cards = {c["id"]: c for c in httpx.get(f"{url}/v1/models").json()["data"]}
    assert cards["one"]["parent"] == cards["two"]["parent"] == base_name
    assert cards[base_name]["parent"] is None

    again = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "two", "lora_path": adapter_dirs[1]}
    )
    assert again.status_code == 400 and again.json()["error"]["code"] == "lora_already_loaded"
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "two"})
    assert gone.status_code == 200
    assert complete(served, "two").status_code == 404
    unknown = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "two"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_an_adapter_gone_before_queueing_is_a_404() -> None:
    # unloaded between resolve_model and the engine's admission: still OpenAI's unknown model
    err = to_http_error(AdapterNotFoundError("two"))
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")


def test_bad_adapters_are_400_and_the_server_keeps_serving(
    served: InProcessServer, adapter_dirs: list[str], tmp_path: Path
) -> None:
    url = served.url
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    with open(big / "adapter_model.safetensors", "wb") as f:
        f.truncate(1 << 30)
    for path, code in [
        (bad, "invalid_lora_adapter"),
        (big, "lora_adapter_too_large"),
        (tmp_path / "nowhere", "invalid_lora_adapter"),
    ]:
        resp = httpx.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(path)}
        )
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == code
    shapeless = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x"})
    assert shapeless.status_code == 400
    assert complete(served, "one").status_code == 200
    assert complete(served, served.state.model_name).status_code == 200


def test_runtime_updates_are_off_by_default(tiny_model_dir: Path, adapter_dirs: list[str]) -> None:
    eng = engine(tiny_model_dir, adapter_dirs)
    with InProcessServer(lambda: eng) as srv:
        resp = httpx.post(
            f"{srv.url}/v1/load_lora_adapter",
            json={"lora_name": "two", "lora_path": adapter_dirs[1]},
        )
        assert resp.status_code == 403
        assert resp.json()["error"]["code"] == "lora_updates_disabled"
        assert complete(srv, "one").status_code == 200


def test_runtime_loads_stay_under_the_runtime_dirs(
    tiny_model_dir: Path, adapter_dirs: list[str], tmp_path: Path
) -> None:
    allowed = Path(adapter_dirs[1]).parent
    eng = engine(
        tiny_model_dir,
        adapter_dirs,
        allow_runtime_lora_updating=True,
        lora_runtime_dirs=(str(allowed),),
    )
    (allowed / "escape").symlink_to(tmp_path)
    try:
        with InProcessServer(lambda: eng) as srv:
            for path in ["/etc", f"{allowed}/../{tmp_path.name}", f"{allowed}/escape"]:
                resp = httpx.post(
                    f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}
                )
                assert resp.status_code == 403, (path, resp.text)
                assert resp.json()["error"]["code"] == "lora_path_not_allowed"
            resp = httpx.post(
                f"{srv.url}/v1/load_lora_adapter",
                json={"lora_name": "two", "lora_path": adapter_dirs[1]},
            )
            assert resp.status_code == 200, resp.text
            assert complete(srv, "two").status_code == 200
    finally:
        (allowed / "escape").unlink()


def test_serve_flags_reach_the_engine_config() -> None:
    import argparse

    from llmos_worker.server.main import add_arguments, engine_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = ["--lora", "sql=/a", "--lora-modules", "chat=/b"]
    args = parser.parse_args([*flags, "--max-loras", "2", "--max-lora-rank", "8"])
    config = engine_config(args)
    assert config.enable_lora
    assert config.lora_modules == {"sql": "/a", "chat": "/b"}
    assert (config.max_loras, config.max_lora_rank) == (2, 8)
    dirs = parser.parse_args(["--lora-runtime-dir", "/m/a", "--lora-runtime-dir", "/m/b"])
    assert engine_config(dirs).lora_runtime_dirs == ("/m/a", "/m/b")
    assert not engine_config(parser.parse_args([])).enable_lora
    with pytest.raises(ValueError, match="twice"):
        engine_config(parser.parse_args(["--lora", "a=/x", "--lora", "a=/y"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora", "no-path"])

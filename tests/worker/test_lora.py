"""LoRA adapters on the tiny random Llama: the worker's greedy output equals PEFT + transformers.

Adapters are made at test time with PEFT (seeded, random non-zero A and B, saved with
`save_pretrained`): one on every projection, one on attention only with rsLoRA scaling and
another rank. Each runs through the engine with the native kernels and with the pure-torch path;
a mixed batch (base model + two adapters) runs in shared forwards and gives each request the
tokens it gets alone, with the products taken for every slot at once and run by run; one slot
for two adapters serialises them; the prefix cache never hands one adapter's K/V to another.
Bad adapters are refused with a reason before anything reaches the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos_worker.engine import EngineConfig, LLMEngine, SamplingParams
from llmos_worker.engine.adapters import AdapterNotFoundError
from llmos_worker.model import ForwardBatch, load_model
from llmos_worker.model import kernels as kernels_module
from llmos_worker.model import lora as lora_module
from llmos_worker.model.lora import AdapterError, LoRAStack, read_adapter
from tests.worker.lora_util import hf_greedy, make_adapter

NEW_TOKENS = 12
PROMPTS = [
    [1, 500, 600, 700, 800, 900],
    [1, 4242, 17, 9000, 31, 77, 123, 456, 789, 1011, 1213],
    [1, 42],
    [1, *range(3000, 3021)],  # 22 tokens: several blocks of 4, a partial last one
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two adapters and PEFT's greedy output for each, and the base model's."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.eval()  # type: ignore[no-untyped-call]
    expect = {"base": hf_greedy(base, PROMPTS, NEW_TOKENS)}
    paths = {}
    specs: dict[str, dict[str, Any]] = {
        "full": {"seed": 1, "r": 4, "alpha": 8},
        "attn": {
            "seed": 2,
            "r": 8,
            "alpha": 4,
            "modules": ("q_proj", "v_proj", "o_proj"),
            "use_rslora": True,
        },
    }
    for name, spec in specs.items():
        peft_model = make_adapter(base, root / name, **spec)
        expect[name] = hf_greedy(peft_model, PROMPTS, NEW_TOKENS)
        base = peft_model.unload()
        paths[name] = str(root / name)
    for name in specs:
        assert expect[name] != expect["base"], "the adapter must change the output"
    return {"paths": paths, "expect": expect}


def engine_for(tiny: Any, adapters: dict[str, Any], **cfg: Any) -> LLMEngine:
    cfg.setdefault("kv_cache_memory_bytes", 4 * 2**20)
    cfg.setdefault("block_size", 4)
    cfg.setdefault("lora_modules", dict(adapters["paths"]))
    cfg.setdefault("max_lora_rank", 8)
    return LLMEngine(tiny, EngineConfig(**cfg))


def run(engine: LLMEngine, requests: list[tuple[list[int], str | None]]) -> list[list[int]]:
    """Greedy outputs of (prompt, adapter) requests added together, in order."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    for i, (prompt, lora) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params, lora_name=lora)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[f"r{i}"] for i in range(len(requests))]


class Recorder:
    """Wraps a runner: the LoRA slots of every forward's rows."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.slots: list[set[int]] = []

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        rows = batch.lora_slots
        self.slots.append({-1} if rows is None else set(rows.tolist()))
        return self.runner.execute(batch)  # type: ignore[no-any-return]


@pytest.fixture(params=["auto", "ops", "torch"])
def backend(request: pytest.FixtureRequest, tiny: Any) -> Any:
    tiny.model.set_backend(request.param)
    yield request.param
    tiny.model.set_backend("auto")


@pytest.fixture(params=["dense", "runs"])
def products(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The LoRA products every slot at once (short steps) or run by run (long ones)."""
    if request.param == "runs":
        monkeypatch.setattr(lora_module, "DENSE_ROWS", 0)
    return str(request.param)


@pytest.mark.parametrize("name", ["full", "attn"])
def test_adapter_greedy_equals_peft(
    tiny: Any, adapters: dict[str, Any], backend: str, products: str, name: str
) -> None:
    engine = engine_for(tiny, adapters)
    got = run(engine, [(p, name) for p in PROMPTS])
    assert got == adapters["expect"][name]


def test_mixed_batch_each_request_equals_alone(
    tiny: Any, adapters: dict[str, Any], backend: str, products: str
) -> None:
    engine = engine_for(tiny, adapters)
    recorder = Recorder(engine.runner)
    engine.runner = recorder
    names: list[str | None] = [None, "full", "attn"]
    requests = [(p, names[i % 3]) for i, p in enumerate(PROMPTS * 3)]
    got = run(engine, requests)
    expect = adapters["expect"]
    for (prompt, lora), tokens in zip(requests, got, strict=True):
        assert tokens == expect[lora or "base"][PROMPTS.index(prompt)]
    # the three kinds of rows shared forwards: one pass for all of them, not one per adapter
    assert any(len(s) == 3 for s in recorder.slots)
    assert engine.adapters is not None and engine.adapters.pinned() == 0


def test_decode_steps_with_adapters_take_the_whole_stack_call(
    tiny: Any, adapters: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With backend "auto", decode steps that carry adapters run every layer in one native call
    with the adapters' products inside it (and still equal PEFT, tested above)."""
    if not kernels_module.native_kernels():
        pytest.skip("no native kernels on this CPU")
    calls: list[bool] = []
    original = kernels_module.DecoderStack.__call__

    def spy(self: Any, *args: Any, **kw: Any) -> None:
        lora = args[7] if len(args) > 7 else kw.get("lora")
        calls.append(lora is not None)
        original(self, *args, **kw)

    monkeypatch.setattr(kernels_module.DecoderStack, "__call__", spy)
    engine = engine_for(tiny, adapters)
    got = run(engine, [(PROMPTS[0], "full"), (PROMPTS[1], None), (PROMPTS[2], "attn")])
    assert got == [
        adapters["expect"]["full"][0],
        adapters["expect"]["base"][1],
        adapters["expect"]["attn"][2],
    ]
    assert any(calls), "no decode step with adapters took the whole-stack call"


def test_stack_refuses_a_bad_lora_descriptor(tiny: Any, adapters: dict[str, Any]) -> None:
    if not kernels_module.native_kernels():
        pytest.skip("no native kernels on this CPU")
    stack = LoRAStack(tiny.config, slots=2, max_rank=4)
    assert stack.native_table is not None
    good = kernels_module.StackLoRA(
        stack.native_table, stack.ranks, torch.tensor([0, -1]), stack.max_rank
    )
    assert good.descriptor(2, tiny.config.num_layers).shape == (5,)
    with pytest.raises(ValueError, match="row slots"):
        good.descriptor(3, tiny.config.num_layers)
    too_deep = kernels_module.StackLoRA(stack.native_table, stack.ranks, torch.tensor([0]), 999)
    with pytest.raises(ValueError, match="max rank"):
        too_deep.descriptor(1, tiny.config.num_layers)


def test_one_slot_serialises_adapters_and_keeps_base_rows_flowing(
    tiny: Any, adapters: dict[str, Any]
) -> None:
    engine = engine_for(tiny, adapters, max_loras=1)
    recorder = Recorder(engine.runner)
    engine.runner = recorder
    requests: list[tuple[list[int], str | None]] = [
        (PROMPTS[0], "full"),
        (PROMPTS[1], "attn"),
        (PROMPTS[2], None),
        (PROMPTS[3], "attn"),
    ]
    got = run(engine, requests)
    expect = adapters["expect"]
    assert got == [expect[lora or "base"][PROMPTS.index(p)] for p, lora in requests]
    assert all(len(s - {-1}) <= 1 for s in recorder.slots)
    assert engine.adapters is not None and engine.adapters.slot_loads == 2


def test_prefix_cache_is_keyed_by_adapter(tiny: Any, adapters: dict[str, Any]) -> None:
    engine = engine_for(tiny, adapters)
    prompt = PROMPTS[3]
    expect = adapters["expect"]
    for lora, key in [(None, "base"), ("full", "full"), ("attn", "attn")]:
        before = engine.stats().prefix_cache_hits
        assert run(engine, [(prompt, lora)]) == [expect[key][3]]
        assert engine.stats().prefix_cache_hits == before  # nothing of another adapter's K/V
    before = engine.stats().prefix_cache_hits
    assert run(engine, [(prompt, "full")]) == [expect["full"][3]]
    assert engine.stats().prefix_cache_hits > before  # the same adapter's blocks are reused


def test_unknown_adapter_is_refused_and_unload_stops_new_requests(
    tiny: Any, adapters: dict[str, Any]
) -> None:
    engine = engine_for(tiny, adapters)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(AdapterNotFoundError):
        engine.add_request("x", PROMPTS[0], params, lora_name="nope")
    assert engine.adapters is not None
    engine.add_request("running", PROMPTS[0], params, lora_name="full")
    engine.step()
    engine.adapters.unregister("full")
    with pytest.raises(AdapterNotFoundError):
        engine.add_request("y", PROMPTS[0], params, lora_name="full")
    while engine.has_unfinished():
        engine.step()  # the request admitted before the unload runs to its end
    base_only = LLMEngine(tiny, EngineConfig(kv_cache_memory_bytes=2**20, block_size=4))
    with pytest.raises(AdapterNotFoundError):
        base_only.add_request("z", PROMPTS[0], params, lora_name="full")


def test_evicted_adapter_is_read_again(tiny: Any, adapters: dict[str, Any]) -> None:
    engine = engine_for(tiny, adapters, max_loras=1, max_cpu_loras=1)
    expect = adapters["expect"]
    got = run(engine, [(PROMPTS[0], "full"), (PROMPTS[0], "attn"), (PROMPTS[0], "full")])
    assert got == [expect["full"][0], expect["attn"][0], expect["full"][0]]


# ---- bad adapters ------------------------------------------------------------------------


def _copy(src: str, dst: Path) -> Path:
    dst.mkdir()
    for f in Path(src).iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(directory: Path, **changes: Any) -> None:
    file = directory / "adapter_config.json"
    raw = json.loads(file.read_text())
    raw.update(changes)
    file.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"r": 0}, "positive integer"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_unsupported_configs_are_refused(
    tiny: Any, adapters: dict[str, Any], tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    bad = _copy(adapters["paths"]["full"], tmp_path / "bad")
    _edit_config(bad, **change)
    with pytest.raises(AdapterError, match=message):
        read_adapter("bad", bad, tiny.config, 16)


def test_rank_above_the_maximum_is_refused(tiny: Any, adapters: dict[str, Any]) -> None:
    with pytest.raises(AdapterError, match="exceeds the server's max LoRA rank 4") as info:
        read_adapter("attn", adapters["paths"]["attn"], tiny.config, 4)
    assert info.value.code == "lora_rank_too_large"


def test_broken_files_are_refused(tiny: Any, adapters: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = adapters["paths"]["full"]
    cfg = tiny.config
    with pytest.raises(AdapterError, match="not a directory"):
        read_adapter("x", tmp_path / "missing", cfg, 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match=r"adapter_config\.json"):
        read_adapter("x", empty, cfg, 16)
    garbage = _copy(src, tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="cannot read"):
        read_adapter("x", garbage, cfg, 16)
    bad_json = _copy(src, tmp_path / "json")
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="cannot read"):
        read_adapter("x", bad_json, cfg, 16)
    tensors = load_file(str(Path(src) / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    Edit = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    edits: list[tuple[str, Edit, str]] = [
        ("nan", lambda t: {**t, key: t[key] * float("nan")}, "not all finite"),
        ("shape", lambda t: {**t, key: t[key][:, :-1].contiguous()}, "do not fit"),
        ("half", lambda t: {k: v for k, v in t.items() if k != key}, "not both A and B"),
        (
            "other",
            lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(2, 2)},
            "is not a LoRA A/B weight",
        ),
    ]
    for what, edit, message in edits:
        d = _copy(src, tmp_path / what)
        save_file(edit(tensors), str(d / "adapter_model.safetensors"))
        with pytest.raises(AdapterError, match=message):
            read_adapter("x", d, cfg, 16)


def test_oversized_file_is_refused_unread(
    tiny: Any, adapters: dict[str, Any], tmp_path: Path
) -> None:
    big = _copy(adapters["paths"]["full"], tmp_path / "big")
    with open(big / "adapter_model.safetensors", "ab") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB on paper
    with pytest.raises(AdapterError, match="takes at most") as info:
        read_adapter("big", big, tiny.config, 16)
    assert info.value.code == "lora_adapter_too_large"


def test_bad_start_up_adapter_fails_the_engine_with_its_reason(
    tiny: Any, adapters: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(AdapterError, match="exceeds the server's max LoRA rank"):
        engine_for(tiny, adapters, max_lora_rank=4)
    with pytest.raises(AdapterError, match="base model has that name"):
        engine_for(tiny, adapters, lora_modules={tiny.name: adapters["paths"]["full"]})

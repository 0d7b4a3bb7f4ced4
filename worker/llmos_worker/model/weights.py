"""Weight sources: GGUF tensors and safetensors shards, renamed to Hugging Face Llama names.

Both formats are streamed as `(hf_name, float tensor)` pairs so the decoder has one loading
path. llama.cpp's converter permutes the rows of Q and K so that RoPE rotates adjacent pairs
(GPT-J style); we undo that here, so every source ends up in HF's rotate-half layout.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import torch

from llmos_worker.errors import ModelLoadError
from llmos_worker.model.config import ModelConfig
from llmos_worker.model.gguf_file import GGUFFile

_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
# Tensors llama.cpp writes that carry no weights we need (RoPE tables are recomputed).
_GGUF_IGNORED = {"rope_freqs.weight"}


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: (heads, D/2, 2, in) -> (heads, 2, D/2, in)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_weights(gf: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every GGUF tensor under its HF name, Q/K rows restored to HF order."""
    for name in gf.tensors:
        if name in _GGUF_IGNORED:
            continue
        if name in _GGUF_GLOBAL_NAMES:
            yield _GGUF_GLOBAL_NAMES[name], gf.load(name)
            continue
        m = _GGUF_LAYER_RE.match(name)
        if m is None or m.group(2) not in _GGUF_LAYER_NAMES:
            raise ModelLoadError(f"unexpected tensor {name!r} in GGUF file {gf.path}")
        layer, kind = int(m.group(1)), m.group(2)
        tensor = gf.load(name)
        if kind == "attn_q":
            tensor = unpermute_rope_rows(tensor, config.num_heads)
        elif kind == "attn_k":
            tensor = unpermute_rope_rows(tensor, config.num_kv_heads)
        yield f"model.layers.{layer}.{_GGUF_LAYER_NAMES[kind]}.weight", tensor


def gguf_rope_factors(gf: GGUFFile) -> torch.Tensor | None:
    """llama3-style GGUFs store RoPE frequency divisors as `rope_freqs.weight` (D/2,)."""
    if "rope_freqs.weight" in gf.tensors:
        return gf.load("rope_freqs.weight")
    return None


def safetensors_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield tensors of every `*.safetensors` shard in a HF directory (index file honoured)."""
    from safetensors import SafetensorError, safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not shards:
        raise ModelLoadError(f"no *.safetensors files in {model_dir}")
    for shard in shards:
        path = os.path.join(model_dir, shard)
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 — safe_open is not a Mapping
                    yield name, f.get_tensor(name)
        except (OSError, SafetensorError) as exc:
            raise ModelLoadError(f"cannot read safetensors shard {path}: {exc}") from exc

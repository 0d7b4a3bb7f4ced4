"""The shape of a Llama-family model, read from GGUF metadata or a Hugging Face config.json.

One frozen dataclass holds everything the decoder and the KV cache need: sizes, attention
layout (grouped-query heads), RoPE base and scaling, norm epsilon, tied embeddings and the special
token ids. Both weight formats are normalised to it so the model code never looks at file formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmos_worker.errors import ModelLoadError

# HF `model_type` / GGUF `general.architecture` values whose decoder is the plain Llama block.
SUPPORTED_ARCHITECTURES = frozenset({"llama", "mistral"})


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling; `rope_type` is "linear" or "llama3" (others are refused)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of one Llama-family decoder."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ModelLoadError(
                f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ModelLoadError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def num_kv_groups(self) -> int:
        """Query heads sharing one K/V head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a parsed Hugging Face `config.json`."""
        arch = str(cfg.get("model_type", ""))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported model architecture {arch!r}; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ModelLoadError(f"unsupported model: config.json sets {flag}")
        window, max_pos = cfg.get("sliding_window"), cfg.get("max_position_embeddings", 2048)
        if window is not None and int(window) < int(max_pos):
            raise ModelLoadError(f"unsupported model: sliding_window={window} attention")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            # transformers 5 moves rope_theta into `rope_parameters`; 4.x keeps it top-level.
            rope_params = cfg.get("rope_parameters") or {}
            scaling = cfg.get("rope_scaling") or (
                rope_params if rope_params.get("rope_type", "default") != "default" else None
            )
            theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=theta,
                rope_scaling=_rope_scaling(scaling),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json is missing or has a bad field: {exc}") from exc

    @classmethod
    def from_gguf_metadata(
        cls, meta: dict[str, Any], tensor_names: set[str], vocab_size: int
    ) -> ModelConfig:
        """Build from GGUF key/value metadata (`<arch>.block_count`, ...)."""
        arch = str(meta.get("general.architecture", ""))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported GGUF architecture {arch!r}; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(meta[f"{arch}.embedding_length"])
            heads = int(meta[f"{arch}.attention.head_count"])
            head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
            scaling: dict[str, Any] | None = None
            stype = meta.get(f"{arch}.rope.scaling.type")
            if stype == "linear":
                scaling = {"rope_type": "linear", "factor": meta[f"{arch}.rope.scaling.factor"]}
            elif stype not in (None, "none"):
                raise ModelLoadError(f"unsupported GGUF rope scaling type {stype!r}")
            eos = meta.get("tokenizer.ggml.eos_token_id")
            bos = meta.get("tokenizer.ggml.bos_token_id")
            return cls(
                architecture=arch,
                vocab_size=int(meta.get(f"{arch}.vocab_size", vocab_size)),
                hidden_size=hidden,
                intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
                num_layers=int(meta[f"{arch}.block_count"]),
                num_heads=heads,
                num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
                head_dim=head_dim,
                max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
                rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                rope_scaling=_rope_scaling(scaling),
                tie_word_embeddings="output.weight" not in tensor_names,
                bos_token_id=None if bos is None else int(bos),
                eos_token_ids=() if eos is None else (int(eos),),
            )
        except KeyError as exc:
            raise ModelLoadError(f"GGUF metadata lacks the key {exc}") from exc


def _rope_scaling(raw: dict[str, Any] | None) -> RopeScaling | None:
    """Normalise HF/GGUF rope scaling dicts; refuse kinds the decoder does not implement."""
    if not raw:
        return None
    kind = str(raw.get("rope_type") or raw.get("type") or "default")
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(raw["factor"]),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        )
    raise ModelLoadError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")

"""Test helpers for LoRA: PEFT adapters made at test time, and PEFT + transformers greedy output.

`make_adapter` wraps a transformers Llama with PEFT, sets every B matrix to seeded random values
(PEFT initialises B to zero, which would make the adapter a no-op) and saves it with
`save_pretrained`; `peft_greedy` is the reference the worker must match token for token.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(
    base: Any,
    out_dir: Path,
    *,
    seed: int,
    r: int = 4,
    alpha: int = 8,
    modules: Sequence[str] = ALL_MODULES,
    std: float = 0.2,
    use_rslora: bool = False,
) -> Any:
    """Save a seeded random LoRA adapter of `base` (a transformers model) to `out_dir`; returns
    the PEFT model (it wraps `base`: call `unload()` on it before making another one)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(modules),
        lora_dropout=0.0,
        use_rslora=use_rslora,
    )
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    with warnings.catch_warnings():
        # why: PEFT looks for the base model's config.json to check the embedding; a GGUF
        # base has none (the adapter holds no embedding, so there is nothing to check)
        warnings.filterwarnings("ignore", "Could not find a config file", UserWarning)
        peft_model.save_pretrained(str(out_dir))
    peft_model.eval()
    return peft_model


def hf_greedy(model: Any, prompts: Sequence[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of each prompt, one unpadded prompt at a time (EOS included)."""
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            outs.append(y[0, len(ids) :].tolist())
    return outs

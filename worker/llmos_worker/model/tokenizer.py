"""The tokenizer: a thin wrapper over a Hugging Face fast tokenizer, loaded strictly offline.

It is read from the same source as the weights (GGUF metadata or the tokenizer files of a HF
directory), together with the chat template. The wrapper fixes the small surface the engine and
server use (encode/decode, EOS ids, chat templating to token ids) so they never depend on the
details of one transformers version.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from llmos_worker.errors import InvalidRequestError, ModelLoadError


class Tokenizer:
    """Text <-> token ids, EOS ids and the chat template of one model."""

    def __init__(self, hf: Any, *, extra_eos_token_ids: Iterable[int] = ()) -> None:
        self.hf = hf
        eos = {int(i) for i in extra_eos_token_ids}
        if hf.eos_token_id is not None:
            eos.add(int(hf.eos_token_id))
        self.eos_token_ids: set[int] = eos
        self.vocab_size: int = len(hf)

    @classmethod
    def from_gguf(cls, path: str, *, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Build from a GGUF file's metadata (works for `/proc/self/fd/N` paths too)."""
        from transformers import PreTrainedTokenizerFast

        try:
            # why not AutoTokenizer: it also parses the model config with a slow reader (~10 s)
            hf = PreTrainedTokenizerFast.from_pretrained(
                os.path.dirname(path) or ".",
                gguf_file=os.path.basename(path),
                local_files_only=True,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot build a tokenizer from GGUF {path}: {exc}") from exc
        return cls(hf, extra_eos_token_ids=extra_eos_token_ids)

    @classmethod
    def from_dir(cls, model_dir: str, *, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Build from the tokenizer files of a HF directory; honours generation_config EOS ids."""
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc
        eos = set(extra_eos_token_ids)
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                gen_eos = json.load(f).get("eos_token_id")
            if isinstance(gen_eos, int):
                gen_eos = [gen_eos]
            eos.update(gen_eos or [])
        return cls(hf, extra_eos_token_ids=eos)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(list(ids)))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Render the model's chat template and tokenize it (special tokens are in the text)."""
        if not self.has_chat_template:
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        try:
            text = self.hf.apply_chat_template(
                messages,
                tools=tools or None,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # why: jinja raises many types (TemplateError, TypeError, ...)
            raise InvalidRequestError(
                f"chat template failed on these messages: {exc}", param="messages"
            ) from exc
        return self.encode(str(text), add_special_tokens=False)

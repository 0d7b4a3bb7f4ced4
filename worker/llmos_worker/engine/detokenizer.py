"""Incremental detokenization and stop-string handling for one sequence at a time.

Decoding every output token on its own breaks multi-byte characters and, for SentencePiece-style
tokenizers, leading spaces. As in vLLM, each step decodes a short window twice — the tokens
already shown (`prefix_offset:read_offset`) and the same window plus the new tokens — and appends
the difference, waiting while the tail is an incomplete UTF-8 sequence ("\\ufffd"). Stop strings
are searched only in the region the new text can touch; the text is cut at the earliest match.
While a sequence runs, a tail that could still grow into a stop string is held back from the
visible text, so a streamed client never sees part of a stop string that is later removed.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Protocol

from llmos_worker.engine.sequence import Sequence

# how many prompt tokens seed the decode window (context for the first output token's spacing)
PROMPT_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, ids: Seq[int], skip_special_tokens: bool = True) -> str: ...


def init_offsets(seq: Sequence) -> None:
    """Point the decode window at the end of the prompt."""
    seq.read_offset = seq.num_prompt_tokens
    seq.prefix_offset = max(seq.num_prompt_tokens - PROMPT_CONTEXT_TOKENS, 0)


class Detokenizer:
    """Turns appended token ids into text and finds stop strings."""

    def __init__(self, tokenizer: Decoder):
        self.tokenizer = tokenizer

    def decode_new(self, seq: Sequence, upto: int | None = None) -> int:
        """Append the text of tokens up to index `upto` (default: all) to `seq.text`.

        Returns the number of characters appended (0 while the tail is an incomplete character).
        """
        end = seq.num_tokens if upto is None else upto
        if end <= seq.read_offset:
            return 0
        skip = seq.params.skip_special_tokens
        ids = seq.token_ids
        prefix_text = self.tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip)
        full_text = self.tokenizer.decode(ids[seq.prefix_offset : end], skip)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return 0
        new_text = full_text[len(prefix_text) :]
        seq.text += new_text
        seq.prefix_offset = seq.read_offset
        seq.read_offset = end
        return len(new_text)

    @staticmethod
    def check_stop_strings(seq: Sequence, num_new_chars: int) -> bool:
        """Cut `seq.text` at the earliest stop string touching the new characters; True if found."""
        stops = seq.params.stop
        if not stops or num_new_chars == 0:
            return False
        text = seq.text
        best: tuple[int, str] | None = None
        for stop in stops:
            idx = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return False
        idx, stop = best
        seq.text = text[: idx + len(stop)] if seq.params.include_stop_str_in_output else text[:idx]
        seq.stop_reason = stop
        return True

    @staticmethod
    def visible_text(seq: Sequence) -> str:
        """`seq.text` minus a tail that is a proper prefix of a stop string (while running)."""
        text = seq.text
        if seq.finish_reason is not None or not seq.params.stop:
            return text
        held = 0
        for stop in seq.params.stop:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return text[: len(text) - held] if held else text

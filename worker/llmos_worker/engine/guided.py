"""Grammar-constrained decoding with llguidance: JSON schemas, regexes, choices, Lark grammars.

A request's constraint is a `Guide` (a grammar in llguidance's format, built from a JSON schema,
a regular expression, a list of choices or a Lark grammar). Each sequence of such a request owns
an `LLMatcher` that follows its output tokens; before sampling, the sampler asks every
constrained row's matcher for the bitmask of allowed next tokens (llguidance computes it in
native code, about 15 us for a JSON schema over SmolLM2's 49,152 tokens), unpacks all the masks
at once into a boolean tensor and sets the disallowed logits to -inf in one `masked_fill` for the
whole batch: no Python loop over the vocabulary. End-of-sequence is allowed by the matcher only
where the grammar may end, and a sequence whose grammar is complete stops there.

Why llguidance over xgrammar (both measured on this machine, SmolLM2's vocabulary): llguidance
is one wheel with no dependencies, while xgrammar pulls in triton and apache-tvm-ffi (hundreds
of MB for a CPU image); llguidance needs no per-schema compilation pass (a matcher for a nested
schema is built in about 1 ms, its tokenizer index once per engine in about 0.3 s) and computes
masks lazily per step, so a new schema never stalls the batch; it takes JSON schema, regex and
Lark (a superset of what vLLM's `guided_grammar` users write) directly, and vLLM ships it as its
`guidance` backend. Its own `apply_token_bitmask_inplace` is slow on the CPU (seconds on its
first call), so the mask is applied with plain tensor ops here.

Matchers are compiled once per distinct grammar and kept in an LRU (`GuideCache`); each sequence
gets a `deep_copy` of the compiled one. Preemption by recompute keeps a sequence's output tokens,
so its matcher stays valid; forked sequences (n > 1) copy their parent's matcher.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from llmos_worker.errors import InvalidRequestError

MAX_GRAMMAR_BYTES = 256 * 1024
GUIDE_CACHE_SIZE = 256


@dataclass(frozen=True)
class Guide:
    """A constraint on a request's output: llguidance's grammar text and where it came from."""

    grammar: str
    kind: str  # json_schema | json_object | regex | choice | grammar | tool_call
    param: str  # the request field it came from, for error messages

    @staticmethod
    def json_schema(schema: Any, param: str) -> Guide:
        import llguidance

        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidRequestError(
                    f"{param} is not valid JSON: {exc}", param=param, code="invalid_schema"
                ) from exc
        if not isinstance(schema, dict | bool):
            raise InvalidRequestError(
                f"{param} must be a JSON schema object", param=param, code="invalid_schema"
            )
        text = json.dumps(schema)  # why: property order is generation order, as in OpenAI
        _check_size(text, param)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            text, defaults={"whitespace_flexible": False}
        )
        return Guide(grammar, "json_schema", param)

    @staticmethod
    def json_object(param: str) -> Guide:
        return Guide.json_schema({"type": "object"}, param)

    @staticmethod
    def regex(pattern: str, param: str) -> Guide:
        import llguidance

        _check_size(pattern, param)
        return Guide(llguidance.LLMatcher.grammar_from_regex(pattern), "regex", param)

    @staticmethod
    def choice(choices: list[str], param: str) -> Guide:
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise InvalidRequestError(
                f"{param} must be a non-empty list of non-empty strings", param=param
            )
        alternatives = " | ".join(json.dumps(c) for c in choices)
        return Guide.lark(f"start: {alternatives}", param, kind="choice")

    @staticmethod
    def lark(grammar: str, param: str, *, kind: str = "grammar") -> Guide:
        import llguidance

        _check_size(grammar, param)
        return Guide(llguidance.LLMatcher.grammar_from_lark(grammar), kind, param)


def _check_size(text: str, param: str) -> None:
    if len(text.encode()) > MAX_GRAMMAR_BYTES:
        raise InvalidRequestError(
            f"{param} is larger than {MAX_GRAMMAR_BYTES} bytes", param=param, code="invalid_schema"
        )


class GuideCache:
    """Compiled matchers per grammar (LRU), over one engine's tokenizer."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, *, size: int = GUIDE_CACHE_SIZE):
        self._hf = hf_tokenizer
        self._vocab_size = vocab_size
        self._size = size
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()

    @property
    def tokenizer(self) -> Any:
        """llguidance's index of the vocabulary, built on first use (about 0.3 s)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab_size)
            return self._tokenizer

    def check(self, guide: Guide) -> None:
        """Refuse (InvalidRequestError, naming the field) a grammar llguidance cannot use."""
        self.matcher(guide)

    def matcher(self, guide: Guide) -> Any:
        """A fresh matcher for `guide`, copied from the compiled one."""
        import llguidance

        with self._lock:
            compiled = self._compiled.get(guide.grammar)
            if compiled is not None:
                self._compiled.move_to_end(guide.grammar)
                return compiled.deep_copy()
        tokenizer = self.tokenizer
        ok, error = _validate(llguidance, guide.grammar, tokenizer)
        if not ok:
            raise InvalidRequestError(
                f"{guide.param}: {error}", param=guide.param, code="invalid_schema"
            )
        compiled = llguidance.LLMatcher(tokenizer, guide.grammar)
        if compiled.is_error():
            raise InvalidRequestError(
                f"{guide.param}: {compiled.get_error()}", param=guide.param, code="invalid_schema"
            )
        with self._lock:
            self._compiled[guide.grammar] = compiled
            while len(self._compiled) > self._size:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()


def _validate(llguidance: Any, grammar: str, tokenizer: Any) -> tuple[bool, str]:
    try:
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    except (ValueError, RuntimeError, TypeError) as exc:
        return False, str(exc)
    return (not error), str(error or "")


def allowed_mask(matchers: list[Any], vocab_size: int, width: int) -> torch.Tensor:
    """(len(matchers), width) bool: the tokens each matcher allows next (False past the
    tokenizer's vocabulary). The bitmasks are unpacked at once with numpy (bit i of word w is
    token 32 w + i: little-endian bit order), a few microseconds per row."""
    import numpy as np

    words = (vocab_size + 31) // 32
    bits = np.empty((len(matchers), words), dtype=np.int32)
    for i, matcher in enumerate(matchers):
        bits[i] = np.frombuffer(matcher.compute_bitmask(), dtype=np.int32, count=words)
    unpacked = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")
    mask = np.zeros((len(matchers), width), dtype=np.bool_)
    n = min(width, vocab_size)
    mask[:, :n] = unpacked[:, :n]
    return torch.from_numpy(mask)

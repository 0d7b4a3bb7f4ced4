"""Real text to cut prompts from, with no download: Python's own reference documentation.

The `pydoc_data.topics` module ships with every CPython install and holds the language reference
as plain text (about 460 kB). It is tokenized once with the model's tokenizer; prompts are exact
windows of that token stream, so a prompt of N tokens is N real tokens, not padding.
"""

from __future__ import annotations

from collections.abc import Callable

CORPUS_NAME = "pydoc_data.topics (CPython reference documentation)"


def corpus_text() -> str:
    """All topics of Python's reference documentation, in sorted key order, one text."""
    from pydoc_data.topics import topics  # why: stdlib data, imported only when needed

    return "\n\n".join(topics[key] for key in sorted(topics))


def token_pool(encode: Callable[[str], list[int]], text: str | None = None) -> list[int]:
    """The corpus as one token stream (no special tokens), for cutting prompt windows."""
    return encode(text if text is not None else corpus_text())

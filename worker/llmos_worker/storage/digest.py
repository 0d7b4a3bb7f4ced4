"""Content digests of model files and of whole models.

A model's digest is what the operator records in `LLMModel.status.digest` and what encrypted
files bind as associated data. For a model of one file it is that file's sha256 (so it equals the
`--sha256` a user copies from a download page). For a model of several files it is the sha256 of
the `sha256sum`-style listing of its files — the UTF-8 text of one line `"<hex>  <name>\\n"` per
file, sorted by name — so both the contents and the names of the files are bound.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

READ_BYTES = 4 * 1024 * 1024


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(READ_BYTES):
            h.update(piece)
    return h.hexdigest()


def model_digest(files: Iterable[tuple[str, str]]) -> str:
    """The digest of a model given its `(name, sha256 hex)` files (see the module docstring)."""
    items = sorted(files)
    if not items:
        raise ValueError("a model has at least one file")
    if len(items) == 1:
        return items[0][1]
    listing = "".join(f"{digest}  {name}\n" for name, digest in items)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def normalise_sha256(value: str, *, field: str = "sha256") -> str:
    """`value` as 64 lower-case hex digits (an optional `sha256:` prefix is accepted)."""
    text = value.strip().lower().removeprefix("sha256:")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"{field} must be 64 hex digits, got {value!r}")
    return text


__all__ = ["model_digest", "normalise_sha256", "sha256_file"]

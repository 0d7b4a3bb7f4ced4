"""The serve command's LoRA flags, with vLLM's names.

`--lora-modules name=path ...` (also `--lora name=path`, repeatable), `--enable-lora`,
`--max-loras`, `--max-lora-rank`, `--max-cpu-loras`, `--allow-runtime-lora-updating`, plus
`--lora-key-file` for adapters the loader stored encrypted. Kept apart from `adapters` so that
parsing the command line does not import torch.
"""

from __future__ import annotations

import argparse
from typing import Any


def _module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve command's LoRA flags."""
    a = parser.add_argument
    a(
        "--lora-modules",
        "--lora",
        dest="lora_modules",
        type=_module,
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapters (PEFT directories, or fetch-model directories) served at start-up "
        "under NAME; implies --enable-lora",
    )
    a("--enable-lora", action="store_true", help="serve LoRA adapters (loaded at run time)")
    a("--max-loras", type=int, default=4, help="adapters one batch can mix (model slots)")
    a("--max-lora-rank", type=int, default=16, help="the largest adapter rank accepted")
    a(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="adapters kept parsed in host memory (LRU; default max(max-loras, 32))",
    )
    a("--lora-key-file", default=None, help="key file of adapters stored encrypted")
    a(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter",
    )
    a(
        "--lora-runtime-dir",
        dest="lora_runtime_dirs",
        action="append",
        default=[],
        metavar="DIR",
        help="run-time loads must name a path under DIR (repeatable; default: any path)",
    )


def lora_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`EngineConfig` keyword arguments from the parsed LoRA flags."""
    modules = dict(args.lora_modules)
    if len(modules) != len(args.lora_modules):
        raise ValueError("--lora-modules names an adapter twice")
    return {
        "enable_lora": bool(args.enable_lora or modules or args.allow_runtime_lora_updating),
        "lora_modules": modules,
        "max_loras": args.max_loras,
        "max_lora_rank": args.max_lora_rank,
        "max_cpu_loras": args.max_cpu_loras,
        "lora_key_file": args.lora_key_file,
        "allow_runtime_lora_updating": args.allow_runtime_lora_updating,
        "lora_runtime_dirs": tuple(args.lora_runtime_dirs),
    }

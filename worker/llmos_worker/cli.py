"""`llmos-worker`: one command line, one sub-command per job the worker image does.

Each sub-command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their sub-command runs, so `fetch-model` never loads torch.
Every flag can also be set by an environment variable (`LLMOS_<FLAG>`, dashes as underscores),
because the operator passes settings to pods that way.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# sub-command -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("llmos_worker.server.main", "serve a model over an OpenAI-compatible HTTP API"),
    "fetch-model": ("llmos_worker.storage.fetch", "download, verify and store model weights"),
    "encrypt-model": ("llmos_worker.storage.cli", "encrypt a model file with envelope encryption"),
    "verify-model": ("llmos_worker.storage.cli", "verify an encrypted model's integrity"),
    "rewrap-key": ("llmos_worker.storage.cli", "re-wrap a model's data key with a new key"),
}


def env_default(name: str, default: str | None = None) -> str | None:
    """The value of `LLMOS_<NAME>` if set, else `default`. Used for argparse defaults."""
    return os.environ.get("LLMOS_" + name.upper().replace("-", "_"), default)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; only `command`'s module is imported to add its flags.

    why: importing every sub-command's module would make `fetch-model` (the loader image's job)
    pay for torch, which only `serve` needs.
    """
    parser = argparse.ArgumentParser(prog="llmos-worker", description=__doc__.splitlines()[0])
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        if name != command:
            continue
        module = _import(module_name)
        if module is not None:
            add = (
                getattr(module, f"add_{name.replace('-', '_')}_arguments", None)
                or module.add_arguments
            )
            add(sub)
    return parser


def _import(module_name: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None  # sub-command not built into this image
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    module = _import(args._module)
    if module is None:
        parser.error(f"sub-command {args.command!r} is not available")
    run = getattr(module, f"run_{args.command.replace('-', '_')}", None) or module.run
    return int(run(args))


if __name__ == "__main__":
    sys.exit(main())

"""The `llmos-worker` command line: loader sub-commands never pay for torch, and `serve --help`
pays for it only when the server runs."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("command", "flag"), [("fetch-model", "--source"), ("serve", "--model")])
def test_help_does_not_import_torch(command: str, flag: str) -> None:
    code = (
        "import sys\n"
        "from llmos_worker import cli\n"
        "try:\n"
        f"    cli.main([{command!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"assert 'torch' not in sys.modules, '{command} --help imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert flag in done.stdout


def test_engine_package_names_resolve_lazily_to_their_modules() -> None:
    import importlib

    import llmos_worker.engine as engine

    assert set(engine.__all__) == set(engine._HOMES)
    for name, home in engine._HOMES.items():
        assert getattr(engine, name) is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = engine.Nope  # type: ignore[attr-defined]


def test_unknown_sub_command_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llmos_worker.cli", "frobnicate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid choice" in done.stderr

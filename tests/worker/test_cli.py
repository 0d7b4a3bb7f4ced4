"""The `llmos-worker` command line: loader sub-commands never pay for torch."""

from __future__ import annotations

import subprocess
import sys


def test_fetch_model_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from llmos_worker import cli\n"
        "try:\n"
        "    cli.main(['fetch-model', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'fetch-model imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--source" in done.stdout


def test_unknown_sub_command_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llmos_worker.cli", "frobnicate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid choice" in done.stderr

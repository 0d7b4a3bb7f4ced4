"""Harness side of the llama.cpp baseline: finds the `.bench-venv` built by
`bench/build_llamacpp.sh`, runs `bench/llamacpp_runner.py` there in a subprocess on a workload
file, and turns its JSON into request timings. When the venv is missing or the run fails, the
reason is returned instead, and the report says so.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from bench.metrics import RequestTiming

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().with_name("llamacpp_runner.py")


def bench_python(venv: Path = ROOT / ".bench-venv") -> Path | None:
    """The bench venv's python if it can import llama_cpp, else None."""
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    ok = subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True, check=False)
    return py if ok.returncode == 0 else None


def run(
    py: Path, model: Path, workload: Path, threads: int, timeout_s: float = 1800.0
) -> tuple[list[RequestTiming], dict[str, Any]]:
    """Run one workload file through llama.cpp; (timings, runner info such as the version)."""
    proc = subprocess.run(
        [str(py), str(RUNNER), str(model), str(workload), "--threads", str(threads)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp runner failed ({proc.returncode}): {proc.stderr[-500:]}")
    data = json.loads(proc.stdout)
    timings = [
        RequestTiming(
            r["request_id"],
            int(r["prompt_len"]),
            float(r["send_time"]),
            [float(x) for x in r["chunk_times"]],
            int(r["output_len"]),
        )
        for r in data["requests"]
    ]
    return timings, {"llama_cpp_version": data["llama_cpp_version"], "threads": data["threads"]}


def sequential_duration(timings: list[RequestTiming]) -> float:
    """Wall time of a one-after-another run: first send to last token."""
    return max(t.chunk_times[-1] for t in timings) - min(t.send_time for t in timings)

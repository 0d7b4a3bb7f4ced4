"""How much memory the KV cache may take: free device memory (CUDA), or host RAM: MemAvailable,
capped by the headroom left under this process's cgroup memory limits (a container's limit).

Why the cgroup: in a pod, /proc/meminfo describes the node, not the container; a KV cache sized
from the node's free memory would push the container past its limit and get it OOM-killed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages): anything past 2^60
_V1_UNLIMITED = 1 << 60


def available_memory_bytes(device: str | torch.device) -> int:
    """Free bytes on `device` now: CUDA from the driver; CPU from /proc/meminfo MemAvailable,
    capped by `cgroup_headroom_bytes`."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    host = _meminfo_available()
    headroom = cgroup_headroom_bytes(CGROUP_ROOT, PROC_SELF_CGROUP)
    return host if headroom is None else min(host, headroom)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    # why: non-Linux hosts; physical pages are the best portable guess
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def cgroup_headroom_bytes(
    root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP
) -> int | None:
    """Bytes this process's cgroups still allow: the least, over its cgroup and the ancestors
    visible under `root`, of limit - (usage - inactive file pages, which the kernel reclaims
    before it kills). None when no limit is set or cgroups cannot be read (not Linux)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one unified hierarchy
            base, names = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            base = root / "memory"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        for directory in _ancestors(base, path):
            room = _headroom(directory, *names)
            if room is not None:
                best = room if best is None else min(best, room)
    return best


def _ancestors(base: Path, path: str) -> list[Path]:
    """base/path and each parent up to base, those that exist (a container sees only its own
    subtree: its cgroup is mounted as the root)."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    dirs = [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _headroom(directory: Path, limit_name: str, usage_name: str, inactive_name: str) -> int | None:
    try:
        raw = (directory / limit_name).read_text().strip()
        usage = int((directory / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    if raw == "max":
        return None
    try:
        limit = int(raw)
    except ValueError:
        return None
    if limit >= _V1_UNLIMITED:
        return None
    stat_name = "memory.stat"
    inactive = 0
    try:
        for line in (directory / stat_name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_name:
                inactive = int(value)
                break
    except (OSError, ValueError):
        pass
    return max(0, limit - max(0, usage - inactive))

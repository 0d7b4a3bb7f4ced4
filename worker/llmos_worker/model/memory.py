"""How much memory the KV cache may take: free device memory (CUDA) or MemAvailable (host RAM)."""

from __future__ import annotations

import os

import torch


def available_memory_bytes(device: str | torch.device) -> int:
    """Free bytes on `device` now: CUDA from the driver, CPU from /proc/meminfo MemAvailable."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    # why: non-Linux hosts; physical pages are the best portable guess
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

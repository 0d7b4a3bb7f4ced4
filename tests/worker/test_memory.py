"""The KV cache's host-memory budget respects the container's cgroup limit: cgroup v2 and v1
trees laid out as a kernel shows them (in temporary directories), unlimited and unreadable
ones, and a limit on a parent cgroup."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmos_worker.model import memory
from llmos_worker.model.memory import available_memory_bytes, cgroup_headroom_bytes

GiB = 1 << 30


def write(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def test_v2_limit_minus_usage_with_inactive_file_reclaimable(tmp_path: Path) -> None:
    root, self_cgroup = tmp_path / "cg", tmp_path / "self"
    self_cgroup.write_text("0::/kubepods/pod1/ctr\n")
    write(
        root / "kubepods/pod1/ctr",
        {
            "memory.max": f"{4 * GiB}\n",
            "memory.current": f"{3 * GiB}\n",
            "memory.stat": f"anon 1\ninactive_file {GiB}\nactive_file 5\n",
        },
    )
    # 4 GiB limit, 3 GiB used of which 1 GiB is reclaimable page cache: 2 GiB of room
    assert cgroup_headroom_bytes(root, self_cgroup) == 2 * GiB
    # a tighter limit on the pod's cgroup (an ancestor) wins
    write(root / "kubepods/pod1", {"memory.max": f"{3 * GiB}\n", "memory.current": f"{2 * GiB}\n"})
    assert cgroup_headroom_bytes(root, self_cgroup) == GiB
    # usage past the limit (it happens briefly): no room, not a negative budget
    write(root / "kubepods/pod1", {"memory.max": f"{GiB}\n", "memory.current": f"{2 * GiB}\n"})
    assert cgroup_headroom_bytes(root, self_cgroup) == 0


def test_v2_unlimited_and_container_root(tmp_path: Path) -> None:
    root, self_cgroup = tmp_path / "cg", tmp_path / "self"
    self_cgroup.write_text("0::/\n")
    write(root, {"memory.max": "max\n", "memory.current": "123\n"})
    assert cgroup_headroom_bytes(root, self_cgroup) is None
    # a container with its own cgroup namespace sees its cgroup as the root
    write(root, {"memory.max": f"{2 * GiB}\n", "memory.current": f"{GiB}\n"})
    assert cgroup_headroom_bytes(root, self_cgroup) == GiB


def test_v1_memory_controller(tmp_path: Path) -> None:
    root, self_cgroup = tmp_path / "cg", tmp_path / "self"
    self_cgroup.write_text("5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n")
    write(
        root / "memory/docker/abc",
        {
            "memory.limit_in_bytes": f"{8 * GiB}\n",
            "memory.usage_in_bytes": f"{2 * GiB}\n",
            "memory.stat": f"inactive_file 7\ntotal_inactive_file {GiB}\n",
        },
    )
    unlimited = {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "5\n"}
    write(root / "memory", unlimited)
    assert cgroup_headroom_bytes(root, self_cgroup) == 7 * GiB
    # the container's cgroup mounted as the controller's root (the host path is not there)
    shutil.rmtree(root / "memory/docker")
    write(
        root / "memory",
        {"memory.limit_in_bytes": f"{GiB}\n", "memory.usage_in_bytes": f"{GiB // 2}\n"},
    )
    assert cgroup_headroom_bytes(root, self_cgroup) == GiB // 2


def test_unreadable_or_absent_means_no_cap(tmp_path: Path) -> None:
    assert cgroup_headroom_bytes(tmp_path / "none", tmp_path / "missing") is None
    (tmp_path / "self").write_text("0::/a\n")
    write(tmp_path / "cg/a", {"memory.max": "garbage\n", "memory.current": "1\n"})
    assert cgroup_headroom_bytes(tmp_path / "cg", tmp_path / "self") is None


def test_host_budget_is_capped_by_this_process_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """available_memory_bytes("cpu") is MemAvailable, or the cgroup's headroom when smaller."""
    uncapped = available_memory_bytes("cpu")
    assert uncapped > 0
    root, self_cgroup = tmp_path / "cg", tmp_path / "self"
    self_cgroup.write_text("0::/\n")
    write(root, {"memory.max": f"{3 << 20}\n", "memory.current": f"{1 << 20}\n"})
    monkeypatch.setattr(memory, "CGROUP_ROOT", root)
    monkeypatch.setattr(memory, "PROC_SELF_CGROUP", self_cgroup)
    assert available_memory_bytes("cpu") == 2 << 20  # a 3 MiB limit, 1 MiB used
    write(root, {"memory.max": "max\n"})
    assert available_memory_bytes("cpu") > 2 << 20  # no limit: the host's MemAvailable

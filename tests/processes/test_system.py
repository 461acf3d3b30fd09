from __future__ import annotations

import os
from pathlib import Path

import psutil

from mpmsub._system import (
    available_memory,
    cgroup_cpu_limit,
    cgroup_memory_limit,
    detect_cpus,
    detect_memory,
    memory_groups,
)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_memory_max_and_cpu_max(tmp_path: Path) -> None:
    write(tmp_path / "proc/self/cgroup", "0::/user.slice/job\n")
    write(tmp_path / "sys/fs/cgroup/user.slice/job/memory.max", "2147483648\n")
    write(tmp_path / "sys/fs/cgroup/user.slice/memory.max", "max\n")
    write(tmp_path / "sys/fs/cgroup/user.slice/job/cpu.max", "150000 100000\n")
    assert cgroup_memory_limit(str(tmp_path)) == 2 * 1024**3
    assert cgroup_cpu_limit(str(tmp_path)) == 2


def test_cgroup_v1_limit_found_at_the_mount_root_inside_a_container(tmp_path: Path) -> None:
    write(tmp_path / "proc/self/cgroup", "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    write(tmp_path / "sys/fs/cgroup/memory/memory.limit_in_bytes", str(512 * 1024**2))
    write(tmp_path / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1")
    write(tmp_path / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000")
    assert cgroup_memory_limit(str(tmp_path)) == 512 * 1024**2
    assert cgroup_cpu_limit(str(tmp_path)) is None


def test_unlimited_cgroups_mean_no_limit(tmp_path: Path) -> None:
    write(tmp_path / "proc/self/cgroup", "4:memory:/\n0::/\n")
    write(tmp_path / "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712")
    write(tmp_path / "sys/fs/cgroup/memory.max", "max")
    assert cgroup_memory_limit(str(tmp_path)) is None
    assert cgroup_memory_limit(str(tmp_path / "missing")) is None


def test_detection_on_this_machine_is_sane() -> None:
    cpus = detect_cpus()
    assert 1 <= cpus <= (os.cpu_count() or 1)
    assert detect_memory() > 64 * 1024**2


MB = 2**20


def test_a_containers_limit_caps_the_available_memory_by_its_working_set(tmp_path: Path) -> None:
    write(tmp_path / "proc/self/cgroup", "4:memory:/docker/abc\n0::/user.slice/job\n")
    v1 = tmp_path / "sys/fs/cgroup/memory/docker/abc"
    write(v1 / "memory.limit_in_bytes", str(1024 * MB))
    write(v1 / "memory.usage_in_bytes", str(700 * MB))
    write(v1 / "memory.stat", f"cache 0\ntotal_inactive_file {200 * MB}\ntotal_rss {500 * MB}\n")
    v2 = tmp_path / "sys/fs/cgroup/user.slice/job"
    write(v2 / "memory.max", str(2048 * MB))
    write(v2 / "memory.current", str(1800 * MB))
    write(v2 / "memory.stat", f"anon {1500 * MB}\ninactive_file {100 * MB}\n")
    groups = memory_groups(str(tmp_path))
    assert len(groups) == 2
    # v1 leaves 1024 - (700 - 200) = 524M; v2 leaves 2048 - (1800 - 100) = 348M: the lower counts
    assert available_memory(groups) == 348 * MB
    write(v2 / "memory.max", "max")  # a limit lifted while running is no longer a cap
    assert available_memory(groups) == 524 * MB


def test_without_a_limit_the_available_memory_is_the_machines(tmp_path: Path) -> None:
    write(tmp_path / "proc/self/cgroup", "4:memory:/\n0::/\n")
    write(tmp_path / "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712")
    write(tmp_path / "sys/fs/cgroup/memory.max", "max")
    assert memory_groups(str(tmp_path)) == []
    assert abs(available_memory([]) - psutil.virtual_memory().available) < 256 * MB


def test_the_machines_memory_is_what_psutil_says() -> None:
    import psutil

    from mpmsub._system import machine_memory

    total, available = machine_memory()
    memory = psutil.virtual_memory()
    assert total == memory.total
    assert abs(available - memory.available) < 0.05 * memory.total  # it moves between the two reads

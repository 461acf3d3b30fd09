from __future__ import annotations

import os
from pathlib import Path

from mpmsub._system import cgroup_cpu_limit, cgroup_memory_limit, detect_cpus, detect_memory


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

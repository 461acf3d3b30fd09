"""What this machine offers: usable CPUs and memory, container (cgroup) limits included."""

from __future__ import annotations

import math
import os
from typing import List, NamedTuple, Optional

import psutil

_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a number near 2**63


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_dirs(root: str, controller: str) -> List[str]:
    """Candidate directories of this process's cgroup for `controller`, innermost first.

    /proc/self/cgroup names the cgroup path; inside a container that path is often not visible
    under the mount, so the mount root itself is the last candidate.
    """
    text = _read(os.path.join(root, "proc/self/cgroup")) or ""
    dirs: List[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controller == "" and controllers == "":
            base = os.path.join(root, "sys/fs/cgroup")  # v2: one unified hierarchy
        elif controller and controller in controllers.split(","):
            base = os.path.join(root, "sys/fs/cgroup", controllers)
        else:
            continue
        rel = path.strip("/")
        while rel:
            dirs.append(os.path.join(base, rel))
            rel = os.path.dirname(rel)
        dirs.append(base)
    return [d for d in dirs if os.path.isdir(d)]


def cgroup_memory_limit(root: str = "/") -> Optional[int]:
    """The lowest memory limit (bytes) of this process's cgroups, v2 or v1; None when unlimited."""
    limits: List[int] = []
    for d in _cgroup_dirs(root, ""):
        value = _read(os.path.join(d, "memory.max"))
        if value and value != "max" and value.isdigit():
            limits.append(int(value))
    for d in _cgroup_dirs(root, "memory"):
        value = _read(os.path.join(d, "memory.limit_in_bytes"))
        if value and value.isdigit() and int(value) < _UNLIMITED:
            limits.append(int(value))
    return min(limits) if limits else None


def cgroup_cpu_limit(root: str = "/") -> Optional[int]:
    """CPUs allowed by a cgroup CPU quota (v2 cpu.max, v1 cfs quota), rounded up; None if none."""
    limits: List[float] = []
    for d in _cgroup_dirs(root, ""):
        value = _read(os.path.join(d, "cpu.max"))
        if value:
            quota, _, period = value.partition(" ")
            if quota.isdigit() and period.isdigit() and int(period) > 0:
                limits.append(int(quota) / int(period))
    for d in _cgroup_dirs(root, "cpu"):
        quota_text = _read(os.path.join(d, "cpu.cfs_quota_us"))
        period_text = _read(os.path.join(d, "cpu.cfs_period_us"))
        if quota_text and period_text and quota_text.isdigit() and period_text.isdigit() and int(period_text) > 0:
            limits.append(int(quota_text) / int(period_text))
    return max(1, math.ceil(min(limits))) if limits else None


def detect_cpus() -> int:
    """CPUs this process may use: its affinity mask (where the OS has one) and any cgroup quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cpus, quota) if quota else cpus)


def detect_memory() -> int:
    """Memory (bytes) this process may use: physical RAM, or a lower cgroup limit."""
    total = int(psutil.virtual_memory().total)
    limit = cgroup_memory_limit()
    return min(total, limit) if limit else total


class MemoryGroup(NamedTuple):
    """A cgroup of this process whose memory limit caps what its jobs may use."""

    limit: str  # file holding the limit in bytes
    usage: str  # file holding the usage in bytes, page cache included
    stat: str  # memory.stat, for the reclaimable part of that usage
    inactive_key: str  # the memory.stat line of inactive file pages


def memory_groups(root: str = "/") -> List[MemoryGroup]:
    """The cgroups of this process (v2 or v1) that have a memory limit below physical RAM."""
    total = int(psutil.virtual_memory().total)
    groups: List[MemoryGroup] = []
    for d in _cgroup_dirs(root, ""):
        value = _read(os.path.join(d, "memory.max"))
        if value and value.isdigit() and int(value) < total and os.path.exists(os.path.join(d, "memory.current")):
            groups.append(
                MemoryGroup(
                    os.path.join(d, "memory.max"),
                    os.path.join(d, "memory.current"),
                    os.path.join(d, "memory.stat"),
                    "inactive_file",
                )
            )
    for d in _cgroup_dirs(root, "memory"):
        value = _read(os.path.join(d, "memory.limit_in_bytes"))
        if value and value.isdigit() and int(value) < total:
            groups.append(
                MemoryGroup(
                    os.path.join(d, "memory.limit_in_bytes"),
                    os.path.join(d, "memory.usage_in_bytes"),
                    os.path.join(d, "memory.stat"),
                    "total_inactive_file",
                )
            )
    return groups


def _stat_value(path: str, key: str) -> int:
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.isdigit():
            return int(value)
    return 0


def available_memory(groups: List[MemoryGroup]) -> int:
    """Bytes that can still be used: the machine's available memory, or less where one of `groups`
    (from memory_groups()) is nearer its limit. A group's usage counts as its working set (less
    its inactive page cache, which the kernel reclaims before it kills), as container tools do."""
    available = int(psutil.virtual_memory().available)
    for group in groups:
        limit, usage = _read(group.limit), _read(group.usage)
        if not (limit and usage and limit.isdigit() and usage.isdigit()):
            continue  # the group went away or its limit was lifted
        working_set = max(0, int(usage) - _stat_value(group.stat, group.inactive_key))
        available = min(available, int(limit) - working_set)
    return max(0, available)

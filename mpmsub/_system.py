"""What this machine offers: usable CPUs and memory, container (cgroup) limits included."""

from __future__ import annotations

import math
import os
import socket
import sys
from typing import List, NamedTuple, Optional, Tuple

_LINUX = sys.platform.startswith("linux")
_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a number near 2**63


_HOST: List[str] = []


def hostname() -> str:
    """This machine's name (read once)."""
    if not _HOST:
        _HOST.append(socket.gethostname())
    return _HOST[0]


def read_file(path: str) -> Optional[str]:
    """A small file's text, stripped; None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def flat_keyed(text: Optional[str], key: str) -> Optional[int]:
    """The number on the line `key N` of a flat-keyed cgroup file (memory.stat, memory.events)."""
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def _own_cgroups(root: str, controller: str, pid: str = "self") -> List[Tuple[str, str]]:
    """(mount directory, path) of this process's cgroup for `controller` ("" for v2's unified
    hierarchy), as /proc/self/cgroup names it; of process `pid` when given."""
    found = []
    for line in (read_file(os.path.join(root, "proc", pid, "cgroup")) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controller == "" and controllers == "":
            found.append((os.path.join(root, "sys/fs/cgroup"), path))  # v2: one unified hierarchy
        elif controller and controller in controllers.split(","):
            found.append((os.path.join(root, "sys/fs/cgroup", controllers), path))
    return found


def own_cgroup(controller: str, root: str = "/", mount: Optional[str] = None) -> Optional[str]:
    """This process's cgroup directory for `controller` ("" for v2), whether visible or not;
    under `mount` instead of the usual mount point when given."""
    for base, path in _own_cgroups(root, controller):
        return os.path.join(mount or base, path.strip("/"))
    return None


def cgroup_of(pid: str, controller: str) -> Optional[str]:
    """The path of process `pid`'s cgroup for `controller` ("" for v2) as /proc names it, or None
    ("self" for this process)."""
    for _, path in _own_cgroups("/", controller, pid):
        return path
    return None


def _cgroup_dirs(root: str, controller: str) -> List[str]:
    """Candidate directories of this process's cgroup for `controller`, innermost first.

    /proc/self/cgroup names the cgroup path; inside a container that path is often not visible
    under the mount, so the mount root itself is the last candidate.
    """
    dirs: List[str] = []
    for base, path in _own_cgroups(root, controller):
        rel = path.strip("/")
        while rel:
            dirs.append(os.path.join(base, rel))
            rel = os.path.dirname(rel)
        dirs.append(base)
    return [d for d in dirs if os.path.isdir(d)]


class MemoryGroup(NamedTuple):
    """A cgroup of this process whose memory limit caps what its jobs may use."""

    limit: str  # file holding the limit in bytes
    usage: str  # file holding the usage in bytes, page cache included
    stat: str  # memory.stat, for the reclaimable part of that usage
    inactive_key: str  # the memory.stat line of inactive file pages


# Per hierarchy (v2, then v1): its limit file, its usage file (page cache included), and the
# memory.stat line of its inactive page cache.
_MEMORY_FILES = (
    ("", "memory.max", "memory.current", "inactive_file"),
    ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
)


def _memory_limits(root: str) -> List[Tuple[int, MemoryGroup]]:
    """Every memory cgroup of ours with a limit, and that limit. v2 says "max" for no limit, v1 a
    number near 2**63."""
    found = []
    for controller, limit_name, usage_name, inactive_key in _MEMORY_FILES:
        for d in _cgroup_dirs(root, controller):
            value = read_file(os.path.join(d, limit_name)) or ""
            if value.isdigit() and int(value) < _UNLIMITED:
                group = MemoryGroup(
                    os.path.join(d, limit_name),
                    os.path.join(d, usage_name),
                    os.path.join(d, "memory.stat"),
                    inactive_key,
                )
                found.append((int(value), group))
    return found


def cgroup_memory_limit(root: str = "/") -> Optional[int]:
    """The lowest memory limit (bytes) of this process's cgroups, v2 or v1; None when unlimited."""
    return min((limit for limit, _ in _memory_limits(root)), default=None)


def cgroup_cpu_limit(root: str = "/") -> Optional[int]:
    """CPUs allowed by a cgroup CPU quota (v2 cpu.max, v1 cfs quota), rounded up; None if none."""
    limits: List[float] = []
    for d in _cgroup_dirs(root, ""):
        value = read_file(os.path.join(d, "cpu.max"))
        if value:
            quota, _, period = value.partition(" ")
            if quota.isdigit() and period.isdigit() and int(period) > 0:
                limits.append(int(quota) / int(period))
    for d in _cgroup_dirs(root, "cpu"):
        quota_text = read_file(os.path.join(d, "cpu.cfs_quota_us"))
        period_text = read_file(os.path.join(d, "cpu.cfs_period_us"))
        if quota_text and period_text and quota_text.isdigit() and period_text.isdigit() and int(period_text) > 0:
            limits.append(int(quota_text) / int(period_text))
    return max(1, math.ceil(min(limits))) if limits else None


def detect_cpus() -> int:
    """CPUs this process may use: its affinity mask (where the OS has one) and any cgroup quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cpus, quota) if quota else cpus)


def machine_memory() -> Tuple[int, int]:
    """The machine's (total, available) memory in bytes: /proc/meminfo's MemTotal and
    MemAvailable on Linux (what psutil reports there, without importing it), else psutil's."""
    text = read_file("/proc/meminfo") if _LINUX else None
    if text:
        fields = {}
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                words = rest.split()
                if words and words[0].isdigit():
                    fields[name] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
        if len(fields) == 2:
            return fields["MemTotal"], fields["MemAvailable"]
    import psutil  # here, not at import: processes that only import the engine (workers) skip it

    memory = psutil.virtual_memory()
    return int(memory.total), int(memory.available)


def detect_memory() -> int:
    """Memory (bytes) this process may use: physical RAM, or a lower cgroup limit."""
    total = machine_memory()[0]
    limit = cgroup_memory_limit()
    return min(total, limit) if limit else total


def memory_groups(root: str = "/") -> List[MemoryGroup]:
    """The cgroups of this process (v2 or v1) that have a memory limit below physical RAM."""
    total = machine_memory()[0]
    return [group for limit, group in _memory_limits(root) if limit < total and os.path.exists(group.usage)]


def available_memory(groups: List[MemoryGroup]) -> int:
    """Bytes that can still be used: the machine's available memory, or less where one of `groups`
    (from memory_groups()) is nearer its limit. A group's usage counts as its working set (less
    its inactive page cache, which the kernel reclaims before it kills), as container tools do."""
    available = machine_memory()[1]
    for group in groups:
        limit, usage = read_file(group.limit), read_file(group.usage)
        if not (limit and usage and limit.isdigit() and usage.isdigit()):
            continue  # the group went away or its limit was lifted
        working_set = max(0, int(usage) - (flat_keyed(read_file(group.stat), group.inactive_key) or 0))
        available = min(available, int(limit) - working_set)
    return max(0, available)

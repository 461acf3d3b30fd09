"""Finding and measuring the process trees of running jobs.

On Linux one scan of /proc/[pid]/stat gives every process's parent, session and resident size, so
one scan per sampling tick serves all running jobs. Elsewhere psutil does the same work.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Dict, Iterable, NamedTuple, Optional, Set

import psutil

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LINUX = sys.platform.startswith("linux") and os.path.isdir("/proc/self")


class Proc(NamedTuple):
    ppid: int
    sid: int
    rss: int  # bytes


Snapshot = Dict[int, Proc]


def snapshot() -> Snapshot:
    """Every process on the machine: pid -> (parent, session, resident bytes)."""
    return _snapshot_proc() if _LINUX else _snapshot_psutil()


def _snapshot_proc() -> Snapshot:
    procs: Snapshot = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:  # the process ended between listdir and open
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = data[data.rindex(b")") + 2 :].split()
        # fields[0] is the state (field 3): ppid is field 4, session 6, rss (pages) 24.
        procs[int(name)] = Proc(int(fields[1]), int(fields[3]), int(fields[21]) * _PAGE)
    return procs


def _snapshot_psutil() -> Snapshot:
    procs: Snapshot = {}
    for proc in psutil.process_iter(["ppid", "memory_info"]):
        try:
            sid = os.getsid(proc.pid)
        except OSError:
            continue
        info = proc.info
        rss = info["memory_info"].rss if info.get("memory_info") is not None else 0
        procs[proc.pid] = Proc(info.get("ppid") or 0, sid, rss)
    return procs


def oom_kill_count() -> Optional[int]:
    """How many processes the kernel's out-of-memory killer has killed since boot (Linux 4.13+)."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def members(snap: Snapshot, roots: Iterable[int]) -> Set[int]:
    """The processes of a job: its root processes, everything in their sessions, and descendants.

    Each job's roots start their own session, so the session catches orphans that were
    re-parented to init; the parent links catch descendants that started a session of their own.
    """
    roots = set(roots)
    found = {pid for pid, proc in snap.items() if pid in roots or proc.sid in roots}
    children: Dict[int, list[int]] = {}
    for pid, proc in snap.items():
        children.setdefault(proc.ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def tree_rss(snap: Snapshot, roots: Iterable[int]) -> int:
    """Resident bytes summed over a job's processes."""
    return sum(snap[pid].rss for pid in members(snap, roots))


def signal_tree(roots: Iterable[int], sig: int) -> None:
    """Send `sig` to every process of the job whose root processes (session leaders) are `roots`.

    Each root must not have been reaped yet: an unreaped root keeps its pid, and so its process
    group id, from being reused, which makes killpg safe.
    """
    roots = list(roots)
    for root in roots:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root, sig)
    for pid in members(snapshot(), roots):
        if pid in roots:
            continue  # signalled through its group above
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_group(root: int) -> bool:
    """SIGKILL what is left in a root's process group; True if anything was there."""
    try:
        os.killpg(root, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True

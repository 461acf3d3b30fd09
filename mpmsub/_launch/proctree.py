"""Finding and measuring the process trees of running jobs.

On Linux one scan of /proc/[pid]/stat gives every process's parent, session and resident size, so
one scan per sampling tick serves all running jobs. Elsewhere psutil does the same work.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
from typing import TYPE_CHECKING, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

if TYPE_CHECKING:
    import psutil


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LINUX = sys.platform.startswith("linux") and os.path.isdir("/proc/self")
MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KB on Linux, bytes on macOS


class Proc(NamedTuple):
    ppid: int
    sid: int
    rss: int  # bytes
    live: bool = True  # False for a zombie: it has exited and holds no memory


class Snapshot(Dict[int, Proc]):
    """Processes seen in one scan: pid -> (parent, session, resident bytes).

    It indexes itself by parent and by session on first use, and records in `claimed` the
    processes that `members` found to belong to a job.
    """

    def __init__(self) -> None:
        super().__init__()
        self.claimed: Set[int] = set()
        self._children: Optional[Dict[int, List[int]]] = None
        self._sessions: Optional[Dict[int, List[int]]] = None

    def index(self) -> Tuple[Dict[int, List[int]], Dict[int, List[int]]]:
        if self._children is None or self._sessions is None:
            self._children, self._sessions = {}, {}
            for pid, proc in self.items():
                self._children.setdefault(proc.ppid, []).append(pid)
                self._sessions.setdefault(proc.sid, []).append(pid)
        return self._children, self._sessions


def snapshot() -> Snapshot:
    """Every process on the machine."""
    return _snapshot_proc(_listing()) if _LINUX else _snapshot_psutil()


def _listing() -> List[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat(pid: int) -> Optional[List[bytes]]:
    """The fields of /proc/PID/stat from the state (field 3) on; None for a process gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:  # the process ended between listdir and open
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return data[data.rindex(b")") + 2 :].split()


def _snapshot_proc(pids: Iterable[int]) -> Snapshot:
    procs = Snapshot()
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            # fields[0] is the state (field 3): ppid is field 4, session 6, rss (pages) 24.
            procs[pid] = Proc(int(fields[1]), int(fields[3]), int(fields[21]) * _PAGE, fields[0] != b"Z")
    return procs


class Scanner:
    """Repeated scans for the monitor, reading only the processes that may belong to a job.

    A process seen unclaimed by any job in two scans in a row is another program's: it cannot
    become part of a job later (a job's processes are its roots and what they start, and a
    process is never re-parented to a job), so it is not read again while it lives. The `fresh`
    processes given to a scan (a new job's first ones) are read whatever was learnt of their
    pids, and every `full_every` scans (or when asked) everything is read again, which bounds the
    effect of a pid reused within one interval. Elsewhere than Linux every scan is a full one.
    """

    def __init__(self, full_every: int = 20) -> None:
        self.full_every = full_every
        self._scans = 0
        self._foreign: Set[int] = set()
        self._unclaimed: Set[int] = set()

    def scan(self, full: bool = False, fresh: Iterable[int] = ()) -> Snapshot:
        if not _LINUX:
            return _snapshot_psutil()
        listing = _listing()
        if full or self._scans % self.full_every == 0:
            self._foreign.clear()
        else:
            self._foreign.intersection_update(listing)
            self._foreign.difference_update(fresh)
        self._scans += 1
        foreign = self._foreign
        return _snapshot_proc([pid for pid in listing if pid not in foreign])

    def settle(self, snap: Snapshot) -> None:
        """After the jobs have measured themselves in `snap`: learn which processes are not theirs."""
        unclaimed = snap.keys() - snap.claimed
        self._foreign |= unclaimed & self._unclaimed
        self._unclaimed = unclaimed


def _snapshot_psutil() -> Snapshot:
    import psutil  # here, not at import: on Linux /proc is read instead

    procs = Snapshot()
    for proc in psutil.process_iter(["ppid", "memory_info", "status"]):
        try:
            sid = os.getsid(proc.pid)
        except OSError:
            continue
        info = proc.info
        rss = info["memory_info"].rss if info.get("memory_info") is not None else 0
        procs[proc.pid] = Proc(info.get("ppid") or 0, sid, rss, info.get("status") != psutil.STATUS_ZOMBIE)
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
    children, sessions = snap.index()
    found = set()
    for root in roots:
        if root in snap:
            found.add(root)
        found.update(sessions.get(root, ()))
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    snap.claimed |= found
    return found


def tree_rss(snap: Snapshot, roots: Iterable[int]) -> int:
    """Resident bytes summed over a job's processes."""
    return sum(snap[pid].rss for pid in members(snap, roots))


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (user + system) of these processes so far, each with its children that it has
    waited for: over a job's live processes, the CPU time of its whole tree until now (a process
    that ended counts in its parent's). A process gone meanwhile counts nothing."""
    total = 0.0
    for pid in pids:
        if _LINUX:
            fields = _stat(pid)
            if fields is not None:
                # utime, stime, cutime, cstime are fields 14-17: 11-14 after the state (field 3).
                total += sum(int(value) for value in fields[11:15]) / _TICKS
        else:
            import psutil

            try:
                times = psutil.Process(pid).cpu_times()
            except (psutil.Error, OSError):
                continue
            total += times.user + times.system + times.children_user + times.children_system
    return total


def signal_tree(roots: Iterable[int], sig: int) -> Set[int]:
    """Send `sig` to every process of the job whose root processes (session leaders) are `roots`;
    return the processes found.

    The tree is read before anything is signalled: a child that started a session of its own is
    found through its parent only while that parent lives, and a signalled parent may die and
    leave it to init before a later scan. Each root must not have been reaped yet: an unreaped
    root keeps its pid, and so its process group id, from being reused, which makes killpg safe.
    """
    roots = list(roots)
    found = members(snapshot(), roots)
    for root in roots:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root, sig)
    for pid in found.difference(roots):  # the roots were signalled through their groups
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return found


class Survivors:
    """The processes of a job being killed that left its sessions, held from the first signal
    until the job ends.

    A process that started a session of its own is the job's only through its parent; once the
    parent dies of the signal, no scan can tell it from another program's. Each such process
    found when the job is signalled is held here (by a pidfd where the system has them, which
    names that process and no other whatever its pid becomes; elsewhere by psutil, which checks
    the process's start time before it signals), signalled again with the job, measured with it,
    and waited for. Processes still in the job's sessions are found by their session at each
    signal, as before, and need no holding.
    """

    def __init__(self) -> None:
        self._held: Dict[int, _Held] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def signal(self, roots: Sequence[int], sig: int, sessions: Sequence[int] = ()) -> None:
        """Send `sig` to the tree of `roots` (unreaped session leaders), to every process in the
        sessions `sessions` (of roots already reaped), and to everything held and what it
        started; hold what is found outside those sessions."""
        snap = snapshot()
        ours = {*roots, *sessions}
        found = members(snap, [*roots, *self.alive()])
        if sessions:
            found |= members(snap, [pid for pid, proc in snap.items() if proc.sid in ours])
        loose = []
        for pid in found.difference(roots):  # held before any parent can die of the signal
            proc = snap[pid]
            if proc.sid in ours:
                loose.append(pid)
            elif proc.live:
                self._hold(pid, proc)
        for root in roots:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(root, sig)
        for pid in loose:  # in a session of the job, just seen: its pid is not free to be reused
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        for held in self._held.values():
            held.send(sig)

    def _hold(self, pid: int, seen: Proc) -> None:
        held = self._held.get(pid)
        if held is not None and held.running():
            return
        if held is not None:  # ended, and its pid taken by another process of the job
            held.close()
        held = _Held.of(pid, seen)
        if held is not None:
            self._held[pid] = held

    def alive(self) -> List[int]:
        """The held processes that have not ended."""
        return [pid for pid, held in self._held.items() if held.running()]

    def fds(self) -> Dict[int, int]:
        """The pidfds of the held processes (readable once each has ended), by pid."""
        return {pid: held.fd for pid, held in self._held.items() if held.fd is not None}

    def close(self) -> None:
        for held in self._held.values():
            held.close()
        self._held.clear()


class _Held:
    """One held process: its pidfd, or where there are none, a psutil handle on it."""

    def __init__(self, fd: Optional[int], proc: Optional[psutil.Process]) -> None:
        self.fd = fd
        self._proc = proc

    @classmethod
    def of(cls, pid: int, seen: Proc) -> Optional[_Held]:
        """A hold on the process `seen` as `pid` in a scan; None if it has ended since."""
        try:
            fd: int = os.pidfd_open(pid)  # type: ignore[attr-defined,unused-ignore]
        except ProcessLookupError:
            return None
        except (AttributeError, OSError):  # no pidfds here (macOS, Linux before 5.3)
            import psutil

            try:
                return cls(None, psutil.Process(pid))
            except psutil.Error:
                return None
        if _LINUX:
            # The pid may have been reused between the scan and pidfd_open: the process the
            # pidfd names must be the one seen (same parent and session).
            now = _snapshot_proc([pid]).get(pid)
            if now is None or (now.ppid, now.sid) != (seen.ppid, seen.sid):
                os.close(fd)
                return None
        return cls(fd, None)

    def running(self) -> bool:
        """Whether the process has not exited: its pidfd is readable once it has."""
        if self.fd is not None:
            poller = select.poll()  # not select(): it refuses fds above 1023
            poller.register(self.fd, select.POLLIN)
            return not poller.poll(0)
        assert self._proc is not None
        import psutil

        try:
            return self._proc.is_running() and self._proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def send(self, sig: int) -> None:
        if self.fd is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(self.fd, sig)  # type: ignore[attr-defined,unused-ignore]
            return
        import psutil

        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if self._proc is not None and self._proc.is_running():  # not a process that took its pid
                self._proc.send_signal(sig)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def kill_group(root: int) -> bool:
    """SIGKILL what is left in a root's process group; True if anything was there."""
    try:
        os.killpg(root, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True

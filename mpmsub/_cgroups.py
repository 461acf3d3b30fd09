"""A memory cgroup per job, where this process may make them (Linux; root with cgroup v1, or a
cgroup v2 tree whose memory controller is delegated to us).

The kernel then counts every page the job's whole tree touches, however short-lived its
processes: the group's peak (`memory.peak` in v2, `memory.max_usage_in_bytes` in v1) is exact
for the tree, and its own OOM-kill count says whether the kernel's OOM killer struck the job.
Both also count the page cache the job's reads and writes bring in, which the kernel can take
back at will; the peak reported is the group's peak less the page cache still charged to the
group at the end (see `JobGroup.peak`).

Placing a process: in v1 a single thread may change group, and a process it starts is born in
the thread's group; the launching thread steps into the job's group around the fork, so that
nothing of the job runs outside it. v2 moves whole processes only: the job's first process is
moved right after it started (anything it forks in that instant stays outside, and is still
measured by sampling). Nothing here raises: where a step fails the job runs without a group.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import sys
import threading
from typing import Iterator, List, Optional

logger = logging.getLogger("mpmsub")

_V2_ROOT = "/sys/fs/cgroup"
_V1_ROOT = "/sys/fs/cgroup/memory"
_OFF = ("0", "off", "no", "false")


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _keyed(text: Optional[str], key: str) -> Optional[int]:
    """The number on the line `key N` of a flat-keyed cgroup file."""
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def _own_path(controller: str) -> Optional[str]:
    """This process's cgroup path in the hierarchy of `controller` ("" for v2)."""
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[1] == controller if controller == "" else controller in parts[1].split(",")):
            return parts[2].strip()
    return None


class JobGroups:
    """The parent group mpmsub made for this launcher's jobs, and a way to make one per job."""

    def __init__(self, parent: str, version: int, home: str) -> None:
        self.parent = parent
        self.version = version
        self._home = home  # v1: the group our launching thread returns to
        self._names = itertools.count(1)
        self._leftover: List[str] = []  # job groups not yet empty when their job ended

    @classmethod
    def detect(cls) -> Optional[JobGroups]:
        """Per-job groups where they can be made here, else None (quietly: measurement then
        rests on rusage and sampling). MPMSUB_CGROUPS=0 turns them off."""
        if not sys.platform.startswith("linux") or os.environ.get("MPMSUB_CGROUPS", "").lower() in _OFF:
            return None
        for make in (cls._v2, cls._v1):
            try:
                groups = make()
            except OSError as exc:
                logger.debug("mpmsub: no per-job memory cgroups: %s", exc)
                continue
            if groups is not None:
                return groups
        return None

    @classmethod
    def _v2(cls) -> Optional[JobGroups]:
        own = _own_path("")
        if own is None or not os.path.exists(os.path.join(_V2_ROOT, "cgroup.controllers")):
            return None
        here = os.path.join(_V2_ROOT, own.strip("/"))
        # Our own group can hand the memory controller to children only if it holds no process
        # (the root group excepted): then it is delegated to us as a subtree we may fill.
        if "memory" not in (_read(os.path.join(here, "cgroup.subtree_control")) or "").split():
            return None
        parent = cls._make_parent(here)
        try:
            _write(os.path.join(parent, "cgroup.subtree_control"), "+memory")
            if not os.path.exists(os.path.join(parent, "memory.peak")):
                raise OSError(f"{parent}: no memory.peak (Linux 5.19 or later has it)")
        except OSError:
            os.rmdir(parent)
            raise
        return cls(parent, 2, here)

    @classmethod
    def _v1(cls) -> Optional[JobGroups]:
        own = _own_path("memory")
        if own is None or not os.path.exists(os.path.join(_V1_ROOT, "memory.max_usage_in_bytes")):
            return None
        here = os.path.join(_V1_ROOT, own.strip("/"))
        if not os.path.isdir(here):  # inside a container the path may not be visible
            return None
        return cls(cls._make_parent(here), 1, here)

    @staticmethod
    def _make_parent(here: str) -> str:
        parent = os.path.join(here, f"mpmsub-{os.getpid()}-{os.urandom(3).hex()}")
        os.mkdir(parent)
        return parent

    def create(self) -> Optional[JobGroup]:
        """A new empty group for one job, or None if it cannot be made now."""
        self._sweep()
        path = os.path.join(self.parent, f"job-{next(self._names)}")
        try:
            os.mkdir(path)
        except OSError as exc:
            logger.debug("mpmsub: no memory cgroup for a job: %s", exc)
            return None
        return JobGroup(path, self)

    def release(self, group: JobGroup) -> None:
        """Remove a job's group once its processes are gone; kill any that are left."""
        group.kill_all()
        try:
            os.rmdir(group.path)
        except OSError:
            self._leftover.append(group.path)  # its last processes are still dying

    def _sweep(self) -> None:
        for path in list(self._leftover):
            with contextlib.suppress(OSError):
                os.rmdir(path)
                self._leftover.remove(path)

    def close(self) -> None:
        for path in self._leftover:
            JobGroup(path, self).kill_all()
        for _ in range(50):  # SIGKILLed processes leave their group within a few ms
            self._sweep()
            if not self._leftover:
                break
            threading.Event().wait(0.01)
        with contextlib.suppress(OSError):
            os.rmdir(self.parent)


class JobGroup:
    """One job's memory cgroup."""

    def __init__(self, path: str, owner: JobGroups) -> None:
        self.path = path
        self._owner = owner

    @contextlib.contextmanager
    def placing(self) -> Iterator[None]:
        """Around starting a job's process (v1): the calling thread is in the job's group, so
        the process starts there."""
        if self._owner.version != 1:
            yield
            return
        tid = str(threading.get_native_id()) if hasattr(threading, "get_native_id") else None
        entered = False
        if tid is not None:
            try:
                _write(os.path.join(self.path, "tasks"), tid)
                entered = True
            except OSError as exc:
                logger.debug("mpmsub: cannot start a job in %s: %s", self.path, exc)
        try:
            yield
        finally:
            if entered:
                try:
                    _write(os.path.join(self._owner._home, "tasks"), tid or "")
                except OSError:  # our home group vanished: the root group is always there
                    with contextlib.suppress(OSError):
                        _write(os.path.join(_V1_ROOT, "tasks"), tid or "")

    def adopt(self, pid: int) -> None:
        """After starting a job's process (v2): move it into the group."""
        if self._owner.version == 2:
            try:
                _write(os.path.join(self.path, "cgroup.procs"), str(pid))
            except OSError as exc:  # it may have exited already
                logger.debug("mpmsub: cannot move %d into %s: %s", pid, self.path, exc)

    def peak(self) -> Optional[int]:
        """The group's peak memory, less the page cache charged to it at the end: bytes of file
        data the job read or wrote that the kernel may take back, not memory the job needs."""
        name = "memory.peak" if self._owner.version == 2 else "memory.max_usage_in_bytes"
        text = (_read(os.path.join(self.path, name)) or "").strip()
        if not text.isdigit():
            return None
        stat = _read(os.path.join(self.path, "memory.stat"))
        cache = _keyed(stat, "file" if self._owner.version == 2 else "cache") or 0
        return max(0, int(text) - cache)

    def oom_kills(self) -> Optional[int]:
        """Processes of the group the kernel's OOM killer killed; None where it does not say."""
        name = "memory.events" if self._owner.version == 2 else "memory.oom_control"
        return _keyed(_read(os.path.join(self.path, name)), "oom_kill")

    def kill_all(self) -> None:
        """SIGKILL every process still in the group (they can only be the job's)."""
        if self._owner.version == 2 and os.path.exists(os.path.join(self.path, "cgroup.kill")):
            with contextlib.suppress(OSError):
                _write(os.path.join(self.path, "cgroup.kill"), "1")
            return
        for pid in (_read(os.path.join(self.path, "cgroup.procs")) or "").split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)

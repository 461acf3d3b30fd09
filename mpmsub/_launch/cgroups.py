"""A memory cgroup per job, where this process may make them (Linux; root with cgroup v1, or a
cgroup v2 group delegated to us: see `_Delegation`).

The kernel then counts every page the job's whole tree touches, however short-lived its
processes: the group's peak (`memory.peak` in v2, `memory.max_usage_in_bytes` in v1) is exact
for the tree, and its own OOM-kill count says whether the kernel's OOM killer struck the job.
Both also count the page cache the job's reads and writes bring in, which the kernel can take
back at will; the peak reported is the group's peak less the page cache still charged to the
group at the end (see `JobGroup.peak`).

A job is placed in its group by the monitor once it has run 0.1 s, not at its start: moving a
process between groups takes a kernel lock every fork on the machine shares, for an RCU grace
period (about 5 ms measured here), which would multiply the cost of starting tiny jobs. Every
process of the tree found then is moved in, and what they start later is born inside. A job
that ends sooner needs no group: the kernel's ru_maxrss from wait4 is exact for its largest
process, and the monitor samples young jobs 50 times a second. In v1 the memory the processes
already hold moves with them (memory.move_charge_at_immigrate); v2 leaves it charged where it
was, so the group's peak is a floor there too. A process found in a cgroup other than the one it
was born in (the job, or `cgexec` or `systemd-run --scope`, placed it there, perhaps to limit its
memory) is left where it is, under the limits chosen for it, and measured by sampling. Every
measure is a floor of the true peak, and the executor reports the highest. Nothing here raises:
where a step fails the job runs without a group.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterable, List, Optional

from mpmsub._system import cgroup_of, flat_keyed, own_cgroup, read_file

logger = logging.getLogger("mpmsub")

_V2_ROOT = "/sys/fs/cgroup"
_OFF = ("0", "off", "no", "false")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _number(path: str) -> Optional[int]:
    text = read_file(path) or ""
    return int(text) if text.isdigit() else None


class JobGroups:
    """The parent group mpmsub made for this launcher's jobs, and a way to make one per job."""

    def __init__(self, parent: str, version: int) -> None:
        self.parent = parent
        self.version = version
        self._names = itertools.count(1)
        self._leftover: List[str] = []  # job groups not yet empty when their job ended
        self._delegation: Optional[_Delegation] = None  # v2: what was changed to make them

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
    def _v2(cls, mount: str = _V2_ROOT, controller: str = "memory", needs: str = "memory.peak") -> Optional[JobGroups]:
        """Job groups in cgroup v2, when our group may hand `controller` to children of ours.
        (`mount`, `controller` and `needs` are parameters so that the steps can be tested on a
        hierarchy without the memory controller.)"""
        here = own_cgroup("", mount=mount)
        if here is None or not os.path.exists(os.path.join(mount, "cgroup.controllers")):
            return None
        with _DELEGATION_LOCK:
            delegation = _Delegation.hold(here, controller)
            if delegation is None:
                return None
            try:
                parent = cls._make_parent(delegation.group)
                try:
                    _write(os.path.join(parent, "cgroup.subtree_control"), f"+{controller}")
                    if not os.path.exists(os.path.join(parent, needs)):
                        raise OSError(f"{parent}: no {needs} (for memory.peak: Linux 5.19 or later)")
                except OSError:
                    os.rmdir(parent)
                    raise
            except OSError:
                delegation.release()
                raise
        groups = cls(parent, 2)
        groups._delegation = delegation
        return groups

    @classmethod
    def _v1(cls) -> Optional[JobGroups]:
        here = own_cgroup("memory")
        # Inside a container the group's path may not be visible under the mount.
        if here is None or not os.path.exists(os.path.join(here, "memory.max_usage_in_bytes")):
            return None
        return cls(cls._make_parent(here), 1)

    @staticmethod
    def _make_parent(here: str) -> str:
        for name in os.listdir(here):  # empty groups left by an mpmsub process that was killed
            pid = name.split("-")[1] if name.startswith("mpmsub-") and name.count("-") == 2 else ""
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _remove_tree(os.path.join(here, name))
        parent = os.path.join(here, f"mpmsub-{os.getpid()}-{os.urandom(3).hex()}")
        os.mkdir(parent)
        return parent

    def create(self) -> Optional[JobGroup]:
        """A new empty group for one job, or None if it cannot be made now."""
        self._sweep()
        path = os.path.join(self.parent, f"job-{next(self._names)}")
        try:
            os.mkdir(path)
            if self.version == 1:  # the memory a process holds moves into the group with it
                with contextlib.suppress(OSError):
                    _write(os.path.join(path, "memory.move_charge_at_immigrate"), "1")
        except OSError as exc:
            logger.debug("mpmsub: no memory cgroup for a job: %s", exc)
            return None
        return JobGroup(path, self)

    def release(self, group: JobGroup) -> None:
        """Remove a job's group (and any the job made inside it) once its processes are gone;
        kill any that are left."""
        group.kill_all()
        if not _remove_tree(group.path):
            self._leftover.append(group.path)  # its last processes are still dying

    def _sweep(self) -> None:
        for path in list(self._leftover):
            if _remove_tree(path):
                self._leftover.remove(path)

    def close(self) -> None:
        """Kill what is left in the job groups and remove them all, with the parent."""
        with contextlib.suppress(OSError):
            self._leftover = [os.path.join(self.parent, name) for name in os.listdir(self.parent)]
            self._leftover = [path for path in self._leftover if os.path.isdir(path)]
        for path in self._leftover:
            JobGroup(path, self).kill_all()
        for _ in range(50):  # SIGKILLed processes leave their group within a few ms
            self._sweep()
            if not self._leftover:
                break
            time.sleep(0.01)
        with contextlib.suppress(OSError):
            os.rmdir(self.parent)
        if self._delegation is not None:
            with _DELEGATION_LOCK:
                self._delegation.release()
            self._delegation = None


def _words(path: str) -> List[str]:
    return (read_file(path) or "").split()


class _Delegation:
    """A cgroup v2 group whose children may be given a controller (the memory controller), and
    what this process changed to make it so, to be undone when the last user is done.

    The kernel lets a group other than the root hand a controller to its children only while it
    holds no process itself. When it already does (the root, or a delegated group whose owner
    arranged it), nothing is changed. When it does not, but the group is delegated to us (it
    offers the controller, it carries systemd's delegation mark, or MPMSUB_CGROUPS=delegate says
    it is ours) and this process is its only member, as with `systemd-run -p Delegate=yes`, this
    process moves into a leaf group of its own inside it (`mpmsub-<pid>-main`), and the controller is enabled for the
    group's children; the job groups are made beside the leaf. Any step that fails undoes the
    ones before it. Everything is undone when the last executor using it closes: the controller is
    disabled, this process (and any process it started meanwhile) moves back, the leaf is
    removed. A group shared with other processes is left alone.
    """

    _held: Optional[_Delegation] = None  # one per process: every executor shares it

    def __init__(self, group: str, leaf: Optional[str], controller: str) -> None:
        self.group = group
        self.leaf = leaf  # None when nothing had to be changed
        self.controller = controller
        self.users = 0
        self.pid = os.getpid()  # a forked child inherits this object, not what it changed

    @classmethod
    def hold(cls, here: str, controller: str) -> Optional[_Delegation]:
        """The delegation for job groups beside `here` (our cgroup), taken if need be; None if
        the controller cannot be handed to children here. Raises OSError when a step fails (the
        steps before it undone)."""
        held = cls._held
        if held is not None and held.pid != os.getpid():
            held = cls._held = None
        if held is not None and held.controller == controller and here in (held.group, held.leaf):
            held.users += 1
            return held
        if controller not in _words(os.path.join(here, "cgroup.controllers")):
            return None
        if controller in _words(os.path.join(here, "cgroup.subtree_control")):
            delegation = cls(here, None, controller)
        elif not os.path.exists(os.path.join(here, "cgroup.type")):
            return None  # the root group: not ours to change the whole machine's hierarchy
        elif _words(os.path.join(here, "cgroup.procs")) != [str(os.getpid())]:
            return None  # other processes share the group: it was not delegated to us alone
        elif not _delegated(here):
            return None  # writable (as root every group is) but its manager did not hand it over
        else:
            delegation = cls(here, cls._take(here, controller), controller)
        delegation.users = 1
        if held is None:
            cls._held = delegation
        return delegation

    @staticmethod
    def _take(here: str, controller: str) -> str:
        """Move this process into a leaf of `here` and enable `controller` for `here`'s children."""
        leaf = os.path.join(here, f"mpmsub-{os.getpid()}-main")
        os.mkdir(leaf)
        try:
            _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
            _write(os.path.join(here, "cgroup.subtree_control"), f"+{controller}")
        except OSError:
            with contextlib.suppress(OSError):
                _write(os.path.join(here, "cgroup.procs"), str(os.getpid()))
            with contextlib.suppress(OSError):
                os.rmdir(leaf)
            raise
        return leaf

    def release(self) -> None:
        """One user is done; the last undoes what was changed. Never raises: what cannot be
        undone (a process started meanwhile that left the leaf) is logged and left."""
        self.users -= 1
        if self.users > 0 or self.pid != os.getpid():
            return
        if self.leaf is not None:
            try:
                _write(os.path.join(self.group, "cgroup.subtree_control"), f"-{self.controller}")
                for pid in _words(os.path.join(self.leaf, "cgroup.procs")):
                    with contextlib.suppress(OSError):  # it may have exited since
                        _write(os.path.join(self.group, "cgroup.procs"), pid)
                os.rmdir(self.leaf)
            except OSError as exc:  # kept as held: the next executor uses it as it is
                logger.warning("mpmsub: cgroup %s left as mpmsub arranged it: %s", self.group, exc)
                return
        if _Delegation._held is self:
            _Delegation._held = None


_DELEGATION_LOCK = threading.Lock()
# The marks systemd (v251 and later) puts on a group it delegates (Delegate=yes), as root or as
# the user's manager; MPMSUB_CGROUPS=delegate says so for a group delegated another way.
_DELEGATE_MARKS = ("trusted.delegate", "user.delegate")


def _delegated(group: str) -> bool:
    """Whether `group` was handed over to its processes to manage."""
    if os.environ.get("MPMSUB_CGROUPS", "").lower() == "delegate":
        return True
    for mark in _DELEGATE_MARKS:
        try:
            if os.getxattr(group, mark) in (b"1", b"1\n"):
                return True
        except (OSError, AttributeError):  # no such mark (or no xattrs on this platform)
            continue
    return False


def _tree(path: str) -> List[str]:
    """A group and the groups inside it, innermost first."""
    found = [root for root, _, _ in os.walk(path, topdown=False)]
    return found or [path]


def _remove_tree(path: str) -> bool:
    """Remove a group and those inside it; True when it is gone."""
    for d in _tree(path):
        try:
            os.rmdir(d)
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return True


def _process_of(pid: int) -> Optional[int]:
    """The process (thread group) a pid belongs to: a thread's id is also accepted by
    cgroup.procs, which then moves the whole process it is part of."""
    for line in (read_file(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("Tgid:"):
            value = line[5:].strip()
            return int(value) if value.isdigit() else None
    return None


class JobGroup:
    """One job's memory cgroup."""

    def __init__(self, path: str, owner: JobGroups) -> None:
        self.path = path
        self._owner = owner
        self.whole = True  # every process adopt() found was moved in: the group's figures are the tree's

    def adopt(self, pids: Iterable[int]) -> bool:
        """Move a job's processes into the group; False if not one could be moved. A process
        that is no longer in the group it was born in (ours) was put elsewhere on purpose (by
        `cgexec`, `systemd-run --scope`, or the job itself, perhaps to limit its own memory):
        it is left there, under the limits it chose, and `whole` becomes False."""
        moved = False
        me = os.getpid()
        controller = "memory" if self._owner.version == 1 else ""
        home = cgroup_of("self", controller)
        for pid in pids:
            if pid == me or _process_of(pid) == me:  # a pid reused since the scan, by one of ours
                continue
            where = cgroup_of(str(pid), controller)
            if where is not None and where != home:
                self.whole = False
                continue
            try:
                _write(os.path.join(self.path, "cgroup.procs"), str(pid))
                moved = True
            except OSError:  # it may have exited already
                pass
        return moved

    def peak(self) -> Optional[int]:
        """The group's peak memory less what is still charged to it once its processes are
        gone: page cache of the files the job read or wrote, which the kernel may take back,
        and kernel objects; not memory the job needed."""
        v2 = self._owner.version == 2
        peak = _number(os.path.join(self.path, "memory.peak" if v2 else "memory.max_usage_in_bytes"))
        if peak is None:
            return None
        left = _number(os.path.join(self.path, "memory.current" if v2 else "memory.usage_in_bytes")) or 0
        return max(0, peak - left)

    def oom_kills(self) -> Optional[int]:
        """Processes of the group (or of groups the job made inside it) that the kernel's OOM
        killer killed; None where the kernel does not say."""
        if self._owner.version == 2:  # memory.events counts the groups inside too
            return flat_keyed(read_file(os.path.join(self.path, "memory.events")), "oom_kill")
        counts = [flat_keyed(read_file(os.path.join(d, "memory.oom_control")), "oom_kill") for d in _tree(self.path)]
        known = [c for c in counts if c is not None]
        return sum(known) if known else None

    def kill_all(self) -> None:
        """SIGKILL every process still in the group or inside it (they can only be the job's;
        this process itself is never signalled)."""
        me = str(os.getpid())
        trees = _tree(self.path)
        listed = {d: (read_file(os.path.join(d, "cgroup.procs")) or "").split() for d in trees}
        if any(me in pids for pids in listed.values()):
            listed = {d: [p for p in pids if p != me] for d, pids in listed.items()}
        elif self._owner.version == 2 and os.path.exists(os.path.join(self.path, "cgroup.kill")):
            with contextlib.suppress(OSError):
                _write(os.path.join(self.path, "cgroup.kill"), "1")
                return
        for pids in listed.values():
            for pid in pids:
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)

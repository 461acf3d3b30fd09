"""cgroup v2 delegation, played by a child process placed alone in a v2 group of its own (see
`delegated` in test_measurement.py). Each scenario returns what it saw as a dict.

This machine's memory controller belongs to cgroup v1, so the steps run with another controller
the v2 hierarchy offers (hugetlb): moving into a leaf, handing the controller to the group's
children, making job groups, cgroup.kill, and undoing it all are the same for any controller.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, Dict, List

from mpmsub._launch.cgroups import JobGroups
from mpmsub._system import own_cgroup


def _words(path: str) -> List[str]:
    with open(path) as f:
        return f.read().split()


def _state(mount: str, group: str) -> Dict[str, Any]:
    return {
        "here": own_cgroup("", mount=mount),
        "subtree_control": _words(os.path.join(group, "cgroup.subtree_control")),
        "children": sorted(n for n in os.listdir(group) if os.path.isdir(os.path.join(group, n))),
    }


def _cgroup_of(pid: int, mount: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        path = next(line.split(":", 2)[2] for line in f.read().splitlines() if line.startswith("0::"))
    return os.path.join(mount, path.strip("/"))


def alone(mount: str, group: str, controller: str, needs: str) -> Dict[str, Any]:
    """Two executors' job groups in a group we are alone in; a job adopted and killed; closed."""
    seen: Dict[str, Any] = {}
    first = JobGroups._v2(mount, controller, needs)
    assert first is not None
    seen["taken"] = _state(mount, group)
    second = JobGroups._v2(mount, controller, needs)  # shares what the first changed
    assert second is not None
    job = first.create()
    assert job is not None
    sleeper = subprocess.Popen(["sleep", "30"])
    seen["adopted"] = job.adopt([sleeper.pid])
    seen["job_cgroup"] = _cgroup_of(sleeper.pid, mount) == job.path
    second.close()
    seen["after_second_closed"] = _state(mount, group)
    job.kill_all()  # cgroup.kill
    seen["killed_by"] = sleeper.wait(timeout=5)
    first.release(job)
    first.close()
    seen["closed"] = _state(mount, group)
    return seen


def shared(mount: str, group: str, controller: str, needs: str) -> Dict[str, Any]:
    """Another process shares our group: it is left as it is."""
    other = subprocess.Popen(["sleep", "30"])
    with open(os.path.join(group, "cgroup.procs"), "w") as f:
        f.write(str(other.pid))
    try:
        return {"groups": JobGroups._v2(mount, controller, needs) is not None, "after": _state(mount, group)}
    finally:
        other.kill()
        other.wait()


def unmarked(mount: str, group: str, controller: str, needs: str) -> Dict[str, Any]:
    """Alone in a writable group that nobody marked as handed over: it is left alone."""
    return {"groups": JobGroups._v2(mount, controller, needs) is not None, "after": _state(mount, group)}


def fails(mount: str, group: str, controller: str, needs: str) -> Dict[str, Any]:
    """The last step fails (the job groups lack a file mpmsub needs): every step is undone."""
    try:
        JobGroups._v2(mount, controller, "no-such-file")
        raised = ""
    except OSError as exc:
        raised = str(exc)
    return {"raised": raised, "after": _state(mount, group)}

"""How jobs are measured: peaks against the kernel's figures, CPU time, the memory series, and
per-job memory cgroups where this process may make them. Real processes throughout."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.helpers import job_groups, processes_with, unique_sleep

import mpmsub
from mpmsub import MemoryAwareExecutor
from mpmsub._engine.monitor import pace
from mpmsub._launch.base import MemorySeries
from mpmsub._launch.cgroups import JobGroups

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "benchmarks"))
import accuracy

HOLD = "import time; x = bytearray({mb} * 2**20); time.sleep({hold})"


def program(mb: int, hold: float) -> List[str]:
    return [sys.executable, "-c", HOLD.format(mb=mb, hold=hold)]


def cgroups() -> JobGroups:
    groups = job_groups()
    if groups is None:
        pytest.skip("no per-job memory cgroups here (needs root on cgroup v1, or a delegated cgroup v2 tree)")
    return groups


def test_reported_peaks_match_the_kernels_figures() -> None:
    """The accuracy benchmark with loose bounds: a 300 MB program held 0.05 s, and two 200 MB
    programs at once under a shell, in every configuration this machine offers."""
    for case, reference, got, _ in accuracy.run(accuracy.cases(holds=(0.05,), tree_hold=0.3)):
        for configuration, peak in got.items():
            assert 0.75 * reference <= peak <= 1.25 * reference, (case.name, configuration, peak, reference)


def test_a_short_peak_in_a_large_executor_process_is_still_seen() -> None:
    """ru_maxrss of a child also counts its parent's peak at exec time, so it is trusted only
    above ours: here the executor's process holds 600 MB, and sampling (or the job's cgroup)
    must find the 300 MB program's peak alone."""
    code = (
        "import sys, mpmsub\n"
        "ballast = bytearray(600 * 2**20)\n"
        "with mpmsub.MemoryAwareExecutor(cpus=1, memory='2G') as ex:\n"
        f"    print(ex.submit({program(300, 0.3)!r}).result().memory_used)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert 280 <= float(out.stdout) <= 360, out.stdout


def test_cpu_time_is_user_plus_system_of_the_whole_tree() -> None:
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"
    with MemoryAwareExecutor(cpus=2, memory="1G") as ex:
        busy = ex.submit(["sh", "-c", f"{sys.executable} -c '{burn}'; true"])
        idle = ex.submit(["sleep", "0.4"])
        rb, ri = busy.result(timeout=30), idle.result(timeout=30)
    assert 0.35 <= rb.cpu_used <= 1.0, rb.cpu_used  # the grandchild's CPU, reaped by the shell
    assert ri.cpu_used < 0.1 and ri.runtime >= 0.4


def test_the_memory_series_is_small_ordered_and_holds_the_sampled_peak() -> None:
    grow = (
        "import time\nx = []\nfor _ in range(6):\n    x.append(bytearray(50 * 2**20)); time.sleep(0.1)\ntime.sleep(0.3)"
    )
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        r = ex.submit([sys.executable, "-c", grow]).result(timeout=30)
    series = r.memory_series
    assert 5 <= len(series) <= 256
    times = [t for t, _ in series]
    assert times == sorted(times) and times[0] >= 0 and times[-1] <= r.runtime
    assert 250 <= max(mb for _, mb in series) <= r.memory_used * 1.01
    # It shows the growth: the first point is taken before most of it, the peak after. (The last
    # point may be low again: the interpreter frees the buffers as it exits.)
    peak = max(range(len(series)), key=lambda i: series[i][1])
    assert peak > 0 and series[0][1] < series[peak][1] / 2, series


@given(st.lists(st.tuples(st.floats(0, 0.5), st.integers(0, 2**40)), max_size=2000), st.integers(4, 64))
def test_memory_series_stays_bounded_ordered_and_keeps_the_peak(steps: list, limit: int) -> None:
    series = MemorySeries(limit)
    t = 0.0
    for gap, value in steps:
        t += gap
        series.add(t, value)
    points = series.points
    assert len(points) < limit or not steps
    assert [p[0] for p in points] == sorted(p[0] for p in points)
    if steps:
        assert max(v for _, v in points) == max(v for _, v in steps)


def test_the_monitor_ticks_fast_while_a_job_is_young() -> None:
    assert pace(0.1, 0.1) == 0.02 and pace(0.5, 0.1) == 0.05 and pace(3, 0.1) == 0.1
    assert pace(0.1, 0.01) == 0.01  # never slower than asked


def test_profile_measures_as_runs_do() -> None:
    c = mpmsub.cluster(p=1, m="2G", progress_bar=False)
    c.jobs.append({"cmd": program(300, 0.05), "id": "short"})
    (r,) = c.profile(verbose=False)
    assert 300 <= r.memory_used <= 345, r.memory_used


# -- per-job memory cgroups ------------------------------------------------------------------


BOTH_HOLD = (
    "import os, sys, time\n"
    "x = bytearray(200 * 2**20)\n"
    "open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close()\n"
    "end = time.monotonic() + 10\n"
    "while len(os.listdir(sys.argv[1])) < 2 and time.monotonic() < end:\n"
    "    time.sleep(0.005)\n"
    "time.sleep(0.03)\n"
)


def test_a_jobs_cgroup_catches_a_brief_overlap_that_sampling_misses(tmp_path: Path) -> None:
    cgroups()
    # placed at 0.1 s; then two 200 MB programs overlap for a few tens of ms (each holds its
    # memory until both have it, whenever each started), between slow ticks
    brief = [sys.executable, "-c", BOTH_HOLD, str(tmp_path)]
    both = " & ".join([shlex.join(brief)] * 2)

    class SlowSampling(MemoryAwareExecutor):
        _monitor_interval = 0.5

    with SlowSampling(cpus=1, memory="2G") as ex:
        r = ex.submit(["sh", "-c", f"sleep 0.5; {both} & wait"]).result(timeout=30)
    assert r.success, r.error
    assert r.memory_used >= 390, r.memory_used


def test_a_process_that_escaped_the_jobs_session_dies_with_the_job() -> None:
    cgroups()
    duration = unique_sleep()
    escape = f"sleep 0.3; setsid sleep {duration} </dev/null >/dev/null 2>&1 & exit 0"
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        r = ex.submit(["sh", "-c", escape]).result(timeout=30)
    assert r.success
    deadline = time.monotonic() + 3
    while processes_with(duration) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_with(duration), "a process the job started outlived it"


def test_an_oom_kill_inside_the_job_is_attributed_to_it() -> None:
    groups = cgroups()
    if groups.version != 1:
        pytest.skip("the nested limit below is written for cgroup v1")
    # The job, once in its group, makes a group inside it limited to 100M and runs a 400M
    # program there; the shell then exits 3 (not 137): only the group's count can tell.
    inner = f"exec {sys.executable} -c 'x = bytearray(400 * 2**20)'"
    script = (
        "sleep 0.4\n"
        "cg=/sys/fs/cgroup/memory$(grep ':memory:' /proc/self/cgroup | cut -d: -f3)/inner\n"
        "mkdir $cg && echo 104857600 > $cg/memory.limit_in_bytes\n"
        f'sh -c "echo \\$\\$ > $cg/cgroup.procs && {inner}"\n'
        "exit 3\n"
    )
    with MemoryAwareExecutor(cpus=1, memory="2G") as ex:
        r = ex.submit(["sh", "-c", script]).result(timeout=30)
    assert (r.failure, r.returncode) == ("memory", 3), r.error
    assert r.error is not None and "out-of-memory killer killed one of its processes" in r.error


def test_the_executors_cgroups_are_removed_when_it_closes() -> None:
    groups = cgroups()
    home = os.path.dirname(groups.parent)
    before = {d for d in os.listdir(home) if d.startswith(f"mpmsub-{os.getpid()}-")}
    with MemoryAwareExecutor(cpus=2, memory="1G") as ex:
        for f in [ex.submit(["sleep", "0.3"]) for _ in range(3)]:
            assert f.result(timeout=30).success
    after = {d for d in os.listdir(home) if d.startswith(f"mpmsub-{os.getpid()}-")}
    assert after <= before


def test_cgroup_v2_files_are_read_as_the_kernel_writes_them(tmp_path: Path) -> None:
    """The v2 reading rules on files laid out as the kernel does (this machine may have no v2
    memory controller to try them on)."""
    groups = JobGroups(str(tmp_path), version=2)
    group = groups.create()
    assert group is not None
    job = Path(group.path)
    (job / "memory.peak").write_text(f"{700 * 2**20}\n")
    (job / "memory.current").write_text(f"{100 * 2**20}\n")  # page cache left once the job is gone
    (job / "memory.events").write_text("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert group.peak() == 600 * 2**20
    assert group.oom_kills() == 1
    (job / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    assert group.oom_kills() == 0
    (job / "memory.peak").unlink()
    assert group.peak() is None  # a kernel before 5.19: the group says nothing


def test_cgroup_v1_files_are_read_as_the_kernel_writes_them(tmp_path: Path) -> None:
    groups = JobGroups(str(tmp_path), version=1)
    group = groups.create()
    assert group is not None
    job = Path(group.path)
    (job / "memory.max_usage_in_bytes").write_text(f"{420 * 2**20}\n")
    (job / "memory.usage_in_bytes").write_text(f"{20 * 2**20}\n")
    (job / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (job / "inner").mkdir()  # a group the job made inside its own
    (job / "inner" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert group.peak() == 400 * 2**20
    assert group.oom_kills() == 3


UNIFIED = "/sys/fs/cgroup/unified"  # cgroup v2 beside v1 ("hybrid"), as on this machine


@pytest.fixture
def delegated() -> Iterator[Callable[..., Dict[str, Any]]]:
    """Play a scenario of delegation_scenarios.py in a child process alone in a fresh cgroup v2
    group offering a controller (hugetlb), as systemd's Delegate=yes leaves a service's group."""
    root = Path(UNIFIED)
    offered = (root / "cgroup.controllers").read_text().split() if (root / "cgroup.controllers").exists() else []
    if os.geteuid() != 0 or "hugetlb" not in offered:
        pytest.skip("needs root and a hybrid cgroup v2 hierarchy offering the hugetlb controller")
    enabled = "hugetlb" in (root / "cgroup.subtree_control").read_text().split()
    if not enabled:  # the controller, unused elsewhere, offered to the root's children meanwhile
        (root / "cgroup.subtree_control").write_text("+hugetlb")
    group = root / f"mpmsub-test-{os.urandom(4).hex()}"
    group.mkdir()
    needs = next(n for n in os.listdir(group) if n.startswith("hugetlb.") and n.endswith(".current"))

    def play(scenario: str, delegate: bool = True) -> Dict[str, Any]:
        code = (
            f"import json, os, sys\nopen({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
            "from support import delegation_scenarios\n"
            f"print(json.dumps(delegation_scenarios.{scenario}(*sys.argv[1:])))\n"
        )
        args = [UNIFIED, str(group), "hugetlb", needs]
        env = {**os.environ, "MPMSUB_CGROUPS": "delegate" if delegate else "1"}
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1])

    try:
        yield play
    finally:
        for d in [Path(d) for d, _, _ in os.walk(group, topdown=False)]:  # innermost first
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
            for _ in range(100):
                with contextlib.suppress(OSError):
                    (d / "cgroup.subtree_control").write_text("-hugetlb")
                    d.rmdir()
                    break
                time.sleep(0.02)
        if not enabled:
            (root / "cgroup.subtree_control").write_text("-hugetlb")


def test_a_delegated_v2_group_is_taken_shared_and_given_back(delegated: Callable[..., Dict[str, Any]]) -> None:
    """Alone in a delegated group, mpmsub moves into a leaf, hands the controller to the group's
    children, and makes job groups beside the leaf; a second executor shares that; a job is
    adopted and killed with cgroup.kill; closing the last executor undoes everything."""
    seen = delegated("alone")
    group = os.path.dirname(seen["taken"]["here"])
    leaf = f"mpmsub-{os.path.basename(seen['taken']['here']).split('-')[1]}-main"
    assert seen["taken"]["here"] == os.path.join(group, leaf)
    assert seen["taken"]["subtree_control"] == ["hugetlb"]
    assert len(seen["taken"]["children"]) == 2 and leaf in seen["taken"]["children"]  # leaf, job parent
    assert seen["adopted"] and seen["job_cgroup"]
    assert seen["after_second_closed"]["subtree_control"] == ["hugetlb"]  # the first still uses it
    assert seen["killed_by"] == -signal.SIGKILL
    assert seen["closed"] == {"here": group, "subtree_control": [], "children": []}


def test_a_shared_v2_group_is_left_alone(delegated: Callable[..., Dict[str, Any]]) -> None:
    seen = delegated("shared")
    assert seen["groups"] is False
    assert seen["after"]["subtree_control"] == [] and seen["after"]["children"] == []


def test_a_v2_group_not_handed_over_is_left_alone(delegated: Callable[..., Dict[str, Any]]) -> None:
    """Writable and ours alone, but without systemd's delegation mark or MPMSUB_CGROUPS=delegate."""
    seen = delegated("unmarked", delegate=False)
    assert seen["groups"] is False
    assert seen["after"]["subtree_control"] == [] and seen["after"]["children"] == []


def test_a_failed_step_of_delegation_is_undone(delegated: Callable[..., Dict[str, Any]]) -> None:
    seen = delegated("fails")
    assert "no-such-file" in seen["raised"]
    assert seen["after"]["subtree_control"] == [] and seen["after"]["children"] == []
    assert seen["after"]["here"].startswith(UNIFIED + "/mpmsub-test-")

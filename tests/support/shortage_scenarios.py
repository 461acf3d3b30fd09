"""Runs in which the machine runs short of memory, each played in a process of its own.

The machine's available memory moves with everything else that runs on it: a test that needs it
to fall by a known amount runs its executor in a child process placed in a memory cgroup of its
own (see `run` in test_enforcement.py), where "available" is the cgroup's limit less what our
processes use, exactly. Each scenario returns its jobs' results as dicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import uuid
from typing import Any, Dict, List

import psutil

import mpmsub
from mpmsub import MemoryAwareExecutor
from mpmsub._system import available_memory, memory_groups
from support.helpers import wait_for_event

MB = 2**20
Results = List[Dict[str, Any]]


def grower(
    total_mb: int, step_mb: int = 100, step_delay: float = 0.1, hold: float = 1.0, marker: str = ""
) -> List[str]:
    """A real program that grows by `step_mb` every `step_delay` s up to `total_mb`, then holds."""
    code = (
        "import time\n"
        "chunks = []\n"
        f"while sum(map(len, chunks)) < {total_mb} * 2**20:\n"
        f"    chunks.append(bytearray({step_mb} * 2**20))\n"
        f"    time.sleep({step_delay})\n"
        f"time.sleep({hold})\n"
    )
    return [sys.executable, "-c", code, marker or uuid.uuid4().hex]


ON_TERM_ALLOCATE = """
import signal, sys, time
open(sys.argv[1], 'a').write('run\\n')
hold = []
def on_term(*args):
    open(sys.argv[1], 'a').write('term\\n')
    hold.append(bytearray({mb} * 2**20))
signal.signal(signal.SIGTERM, on_term)
time.sleep(30)
"""


WAIT_FOR_FILE = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.02)\n"
TAKE_AND_WAIT_FOR_FILE = "chunks = [bytearray({mb} * 2**20)]\n" + WAIT_FOR_FILE


def available() -> int:
    """What the executor will see as available; outside a cgroup, once the machine's figure has
    stopped moving (the previous test's processes may still be freeing theirs)."""
    groups = memory_groups()
    if groups:
        return available_memory(groups)
    last = _machine_available()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.4)
        now = _machine_available()
        if abs(now - last) < 20 * MB:
            break
        last = now
    return last


def _machine_available() -> int:
    # The kernel's per-CPU counters folded in first where we may ask for it (root, Linux 4.4+):
    # otherwise the figure trails allocations and frees by up to a second.
    with contextlib.suppress(OSError), open("/proc/sys/vm/stat_refresh", "w") as f:
        f.write("1")
    return available_memory([])


def reserve_leaving(room_mb: int) -> str:
    """A memory_reserve that leaves `room_mb` of what is available now to the executor's jobs."""
    return f"{available() // MB - room_mb}M"


def wait_for_rss(marker: str, mb: int, timeout: float = 30) -> None:
    """Wait until the process whose command line holds `marker` has `mb` MB resident."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["cmdline", "memory_info"]):
            info = proc.info
            if marker in (info["cmdline"] or []) and info["memory_info"] and info["memory_info"].rss >= mb * MB:
                return
        time.sleep(0.02)
    raise TimeoutError(f"the process marked {marker} did not reach {mb} MB in {timeout} s")


def _dicts(*results: mpmsub.JobResult) -> Results:
    return [dataclasses.asdict(r) for r in results]


def live_gate() -> Results:
    with MemoryAwareExecutor(cpus=2, memory="20G", memory_reserve=reserve_leaving(400)) as ex:
        a = ex.submit(mpmsub.Job(grower(250, step_mb=250, hold=1.0)).memory("300M"))
        b = ex.submit(mpmsub.Job(grower(250, step_mb=250, hold=0.2)).memory("300M"))
        return _dicts(a.result(timeout=60), b.result(timeout=60))


def newest_requeued(trace: str) -> Results:
    """A declares 100M but takes 400M (there is budget); B, declaring 100M, then takes 500M: the
    group runs short, B (the newest) is stopped, and comes back once A is done. A holds its memory
    until B has been stopped, however late B starts on a busy machine."""
    done = f"{trace}.done"
    with MemoryAwareExecutor(cpus=2, memory="20G", memory_reserve=reserve_leaving(600), trace=trace) as ex:
        a = ex.submit(mpmsub.Job([sys.executable, "-c", TAKE_AND_WAIT_FOR_FILE.format(mb=400), done]).memory("100M"))
        try:
            wait_for_rss(done, 400)
            b = ex.submit(mpmsub.Job(grower(500, step_mb=250, hold=1.0)).memory("100M"))
            _requeued_peak(trace)
        finally:
            open(done, "w").close()  # A ends: B was stopped, or something failed
        return _dicts(a.result(timeout=60), b.result(timeout=60))


def requeued_too_often() -> Results:
    with MemoryAwareExecutor(cpus=1, memory="20G", memory_reserve=reserve_leaving(300)) as ex:
        return _dicts(ex.submit(grower(900, step_mb=150, hold=3.0)).result(timeout=60))


def grace_not_requeued(runs: str) -> Results:
    with MemoryAwareExecutor(cpus=1, memory="4G", kill_grace=1.5, memory_reserve=reserve_leaving(500)) as ex:
        # The timeout leaves the program time to start, even on a busy machine, before it is told.
        job = mpmsub.Job([sys.executable, "-c", ON_TERM_ALLOCATE.format(mb=1024), runs]).with_timeout(1.0)
        return _dicts(ex.submit(job).result(timeout=30))


def larger_than_free() -> Results:
    free = available() // MB
    with MemoryAwareExecutor(cpus=1, memory=f"{free + 1024}M", memory_reserve="1G") as ex:
        # declares more than there is free (it uses 50M): alone, it may start; it is not held forever
        return _dicts(ex.submit(mpmsub.Job(grower(50, step_mb=50, hold=0.2)).memory(f"{free}M")).result(timeout=30))


def one_by_one() -> Results:
    with MemoryAwareExecutor(cpus=2, memory="20G", memory_reserve=reserve_leaving(900)) as ex:
        big = ex.submit(mpmsub.Job(grower(1400, step_mb=700, hold=1.0)).with_id("big"))
        time.sleep(0.05)
        small = ex.submit(mpmsub.Job(grower(300, step_mb=300, hold=1.5)).with_id("small"))
        return _dicts(big.result(timeout=60), small.result(timeout=60))


def requeued_waits_for_margin(trace: str) -> Results:
    """B is stopped; then the room is made 10% over the peak it was stopped at, for a second, and
    then ample. B was perhaps still growing: it waits for more than its peak, so for the ample room.
    A, which declares nothing, runs throughout, so that B is never alone (alone, it would start)."""
    room = 600
    reserve = reserve_leaving(room)
    ballast = [bytearray(10 * MB) for _ in range(40)]  # 400M of the 600M taken; the test's own
    done = f"{trace}.done"
    with MemoryAwareExecutor(cpus=2, memory="20G", memory_reserve=reserve, trace=trace) as ex:
        a = ex.submit(mpmsub.Job([sys.executable, "-c", WAIT_FOR_FILE, done]))
        try:
            # B grows in small steps: the peak it is stopped at is then close to all the room it had
            # (a 400M allocation at once could be caught mid-way, and then room for 1.2x that peak
            # would already be there when B ends, and B would start again at once).
            b = ex.submit(mpmsub.Job(grower(400, step_mb=10, step_delay=0.02, hold=0.3)).memory("100M"))
            peak = _requeued_peak(trace)
            free = available() - int(reserve[:-1]) * MB  # the room the gate sees now that B has ended
            while ballast and free + 10 * MB <= peak * 1.1:  # at most 1.1x: more than the peak, under 1.2x
                ballast.pop()
                free += 10 * MB
            time.sleep(1.0)  # two looks of the gate at the room
            ample = time.time()
            ballast.clear()
        finally:
            open(done, "w").close()  # A ends: the room is ample, or something failed
        return [*_dicts(a.result(timeout=30), b.result(timeout=30)), {"ample": ample, "peak": peak}]


def _requeued_peak(trace: str) -> int:
    requeued = wait_for_event(
        trace, lambda e: e["type"] == "end" and e["status"] == "requeued", "no job was stopped and requeued", 20
    )
    return int(requeued["peak"])

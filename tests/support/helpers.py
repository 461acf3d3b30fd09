"""Helpers for tests that run real processes."""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import psutil

from mpmsub._launch.cgroups import JobGroups
from mpmsub._report.trace import PathLike
from mpmsub._report.trace import read as read_trace
from mpmsub._result import JobResult


def alloc_cmd(mb: int, hold: float = 0.0, *, steps: int = 1, step_delay: float = 0.0) -> List[str]:
    """A real program that allocates `mb` MB (touching every page) in `steps`, then holds it."""
    code = (
        "import time\n"
        f"chunks = []\n"
        f"for _ in range({steps}):\n"
        f"    chunks.append(bytearray({mb} * 2**20 // {steps}))\n"
        f"    time.sleep({step_delay})\n"
        f"time.sleep({hold})\n"
    )
    return [sys.executable, "-c", code]


def unique_sleep() -> str:
    """A sleep duration no other process on the machine uses, to find leftovers by command line."""
    return f"{random.randint(40, 90)}.{random.randint(100000, 999999)}"


def processes_with(arg: str) -> List[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if arg in (proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def wait_gone(arg: str, timeout: float = 3.0) -> List[psutil.Process]:
    """Processes still alive with `arg` on their command line after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = processes_with(arg)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def wait_for_event(
    trace: PathLike, wanted: Callable[[Dict[str, Any]], bool], what: str, timeout: float = 30
) -> Dict[str, Any]:
    """The first event of a trace being written that is `wanted`, once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in read_trace(trace) if os.path.exists(trace) else []:  # a line being written is left out
            if wanted(event):
                return event
        time.sleep(0.02)
    raise AssertionError(f"{what} within {timeout} s")


def wait_for_end(trace: PathLike, job: str, run: int = 1, timeout: float = 30) -> Dict[str, Any]:
    """The end event of run `run` of job `job` in a trace being written, once it is there."""
    return wait_for_event(
        trace,
        lambda e: e["type"] == "end" and e["job"] == job and e["run"] == run,
        f"run {run} of {job} did not end",
        timeout,
    )


def job_groups() -> Optional[JobGroups]:
    """The per-job memory cgroups executors make here (closed again: for their version), or None."""
    groups = JobGroups.detect()
    if groups is not None:
        groups.close()
    return groups


def a_result(failure: Optional[str], returncode: Optional[int], **fields: Any) -> JobResult:
    """A finished job's JobResult with made-up figures (for what reads results: joblogs, reports)."""
    made: Dict[str, Any] = dict(
        job_id="j1",
        cmd=["x"],
        returncode=returncode,
        stdout=None,
        stderr=None,
        runtime=1.5,
        memory_used=12.25,
        cpu_used=0.1,
        start_time=1700000000.0,
        end_time=1700000001.5,
        failure=failure,
    )
    return JobResult(**{**made, **fields})

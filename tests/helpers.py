"""Helpers for tests that run real processes."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import psutil


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


def wait_for_end(trace: Path, job: str, run: int = 1, timeout: float = 30) -> Dict[str, Any]:
    """The end event of run `run` of job `job` in a trace being written, once it is there."""
    from mpmsub._trace import read  # a line being written is left out

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in read(trace) if trace.exists() else []:
            if event["type"] == "end" and event["job"] == job and event["run"] == run:
                return event
        time.sleep(0.02)
    raise AssertionError(f"run {run} of {job} did not end within {timeout} s")

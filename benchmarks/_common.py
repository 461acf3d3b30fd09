"""Shared pieces of the benchmarks: machine description, timing, and the results file."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

import psutil

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = psutil.virtual_memory().total / 2**30
    return f"{cpus} CPUs, {mem:.0f} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def best_of(runs: int, fn: Callable[[], object]) -> List[float]:
    """Wall times of `runs` calls of fn."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median(values: List[float]) -> float:
    return statistics.median(values)


def record(title: str, lines: List[str]) -> None:
    """Append a section to RESULTS.md: what ran, on what, and the figures."""
    stamp = time.strftime("%Y-%m-%d %H:%M")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    with RESULTS.open("a") as f:
        f.write(f"\n## {title} ({stamp})\n\n`{command}` on {machine()}\n\n")
        for line in lines:
            f.write(f"{line}\n")


def xargs_true(n: int, parallel: int) -> None:
    subprocess.run(["xargs", f"-P{parallel}", "-n1", "true"], input="\n".join(["x"] * n).encode(), check=True)

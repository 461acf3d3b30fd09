"""Shared pieces of the benchmarks: machine description, timing, and the results file."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import psutil

RESULTS = Path(__file__).with_name("RESULTS.md")

# The run history of the benchmarks' jobs goes to a file of their own, not the user's (a
# benchmark that compares with and without a history names its own).
if "MPMSUB_HISTORY" not in os.environ:
    import tempfile

    os.environ["MPMSUB_HISTORY"] = os.path.join(tempfile.mkdtemp(prefix="mpmsub-bench-"), "history.db")


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


def interleaved(runs: int, ways: Dict[str, Callable[[], object]]) -> Dict[str, float]:
    """The median time of each way, the ways run in turn `runs` times, so that all see the same
    machine load."""
    return interleaved_medians(runs, {name: functools.partial(_timed, way) for name, way in ways.items()})


def _timed(fn: Callable[[], object]) -> float:
    return best_of(1, fn)[0]


def interleaved_medians(runs: int, ways: Dict[str, Callable[[], float]]) -> Dict[str, float]:
    """The median of the figure each way returns (one it measures itself, such as a time taken
    inside a child process), the ways run in turn `runs` times."""
    figures: Dict[str, List[float]] = {name: [] for name in ways}
    for _ in range(runs):
        for name, way in ways.items():
            figures[name].append(way())
    return {name: median(values) for name, values in figures.items()}


def arguments(description: Optional[str], runs: int) -> argparse.ArgumentParser:
    """The options every benchmark takes: --runs and --record."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    return parser


def report(title: str, lines: List[str], keep: bool) -> None:
    """Print the figures with the machine they were measured on; with `keep`, append them to RESULTS.md."""
    print(f"machine: {machine()}")
    print("\n".join(lines))
    if keep:
        record(title, lines)


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


def per_job_table(what: str, runs: int, jobs: int, times: List[Tuple[str, float]], digits: int = 3) -> List[str]:
    """A markdown table of the median times of ways of running `jobs` jobs, and their time per job."""
    lines = [f"| {what} | median of {runs} | per job |", "|---|---|---|"]
    lines += [f"| {label} | {t:.{digits}f} s | {t / jobs * 1e3:.{digits}f} ms |" for label, t in times]
    return lines


class Figure(NamedTuple):
    """One benchmark's verdict: the figure measured, its target, and the detail behind it."""

    name: str
    value: str  # as printed, e.g. "1.04x the lower bound"
    target: str
    ok: bool
    detail: List[str]  # markdown lines


def show(title: str, figures: List[Figure], keep: bool) -> None:
    """Print figures (detail, then a summary table); with `keep`, append them to RESULTS.md."""
    lines: List[str] = []
    for figure in figures:
        if figure.detail:
            lines += [*figure.detail, ""]
    lines += ["| benchmark | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {f.name} | {f.value} | {f.target} | {'yes' if f.ok else '**no**'} |" for f in figures]
    report(title, lines, keep)


class TreeSampler:
    """Samples, every `interval` seconds on a thread, the resident memory of all of this
    process's descendants together, and keeps the peak (bytes)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

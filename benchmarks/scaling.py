"""Scaling: per-job cost at 500 and 20,000 jobs through each API, 100,000 queued submits, and
cancelling them.

1. N `true` jobs on 2 slots, N = 500 and 20,000, through the executor, the cluster API and the
   `mpmsub run` command line (interleaved runs, medians): wall time per job at 20,000 over wall
   time per job at 500, for each. The command line's time is taken less that of a run of one
   job, so that the interpreter's start is not spread over the jobs. Target: at most 1.15 for
   each (nothing grows with the batch).
2. 100,000 submits while one running job holds the only CPU, so that all of them queue: the
   time to submit them and the growth of this process's resident memory. Targets: under 2 s
   and under 200 MB.
3. `shutdown(wait=False, cancel_futures=True)` of those: the time until every future is
   cancelled. Target: under 1 s.
Usage: python benchmarks/scaling.py [--runs 3] [--record]
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import psutil

sys.path.insert(0, str(Path(__file__).parent))

from _common import Figure, arguments, median, show

import mpmsub

MB = 2**20
SMALL, LARGE = 500, 20_000


def executor_true(n: int) -> float:
    started = time.perf_counter()
    with mpmsub.MemoryAwareExecutor(cpus=2, memory="1G") as ex:
        futures = [ex.submit(["true"]) for _ in range(n)]
        for f in futures:
            if not f.result().success:
                raise RuntimeError(f.result().error)
    return time.perf_counter() - started


def cluster_true(n: int) -> float:
    started = time.perf_counter()
    batch = mpmsub.cluster(p=2, m="1G", verbose=False, progress_bar=False)
    batch.jobs.extend([["true"]] * n)
    stats = batch.run()
    if stats["jobs"]["completed"] != n:
        raise RuntimeError(f"the cluster completed {stats['jobs']['completed']} of {n} jobs")
    return time.perf_counter() - started


def _cli(n: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("true\n" * n)
    try:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mpmsub", "run", f.name, "-p", "2", "-m", "1G", "-q"], check=True)
        return time.perf_counter() - started
    finally:
        os.unlink(f.name)


def cli_true(n: int) -> float:
    """The command line's time for n jobs, less its time for one (its interpreter's start)."""
    return _cli(n) - _cli(1)


WAYS: Dict[str, Callable[[int], float]] = {
    "executor": executor_true,
    "cluster API": cluster_true,
    "mpmsub run": cli_true,
}


def per_job(runs: int) -> List[Figure]:
    figures = []
    for name, way in WAYS.items():
        small: List[float] = []
        large: List[float] = []
        for _ in range(runs):
            small += [way(SMALL) / SMALL for _ in range(3)]
            large.append(way(LARGE) / LARGE)
        ratio = median(large) / median(small)
        detail = [
            f"| `true` jobs on 2 slots, {name} | runs | wall time per job (median) |",
            "|---|---|---|",
            f"| {SMALL:,} | {len(small)} | {median(small) * 1e3:.3f} ms |",
            f"| {LARGE:,} | {len(large)} | {median(large) * 1e3:.3f} ms |",
        ]
        figures.append(
            Figure(f"per-job cost, {LARGE:,} vs {SMALL} jobs, {name}", f"{ratio:.2f}", "<= 1.15", ratio <= 1.15, detail)
        )
    return figures


def queued_submits(n: int = 100_000) -> List[Figure]:
    me = psutil.Process()
    gc.collect()
    before = me.memory_info().rss
    ex = mpmsub.MemoryAwareExecutor(cpus=1, memory="1G")
    try:
        blocker = ex.submit(["sleep", "60"])
        while ex.status().running < 1:
            time.sleep(0.01)
        started = time.perf_counter()
        futures = [ex.submit(["true"]) for _ in range(n)]
        submit_time = time.perf_counter() - started
        while ex.status().queued < n:  # every job has reached the queue
            time.sleep(0.01)
        grown = (me.memory_info().rss - before) / MB
        started = time.perf_counter()
        ex.shutdown(wait=False, cancel_futures=True)
        while not futures[-1].done():
            time.sleep(0.001)
        cancel_time = time.perf_counter() - started
        if not all(f.cancelled() for f in futures):
            raise RuntimeError("a queued job was not cancelled")
        blocker.cancel()
    finally:
        ex.terminate()
    detail = [
        f"| {n:,} queued submits | measured |",
        "|---|---|",
        f"| time to submit | {submit_time:.2f} s ({submit_time / n * 1e6:.1f} us each) |",
        f"| resident memory grown | {grown:.0f} MB ({grown * MB / n:.0f} bytes each) |",
        f"| shutdown(cancel_futures=True) until all cancelled | {cancel_time:.3f} s |",
    ]
    return [
        Figure(f"{n:,} queued submits: time", f"{submit_time:.2f} s", "< 2 s", submit_time < 2, detail),
        Figure(f"{n:,} queued submits: memory", f"{grown:.0f} MB", "< 200 MB", grown < 200, []),
        Figure(f"shutdown(cancel_futures=True) of {n:,}", f"{cancel_time:.3f} s", "< 1 s", cancel_time < 1, []),
    ]


def measure(runs: int = 3) -> List[Figure]:
    return [*per_job(runs), *queued_submits()]


def main() -> None:
    args = arguments(__doc__, runs=3).parse_args()
    show("Scaling", measure(args.runs), args.record)


if __name__ == "__main__":
    main()

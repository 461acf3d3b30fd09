"""Memory-blind parallelism against mpmsub, on the same memory-bound batch (well under a minute).

The batch: 3 big, 6 medium and 12 small jobs (each a Python program that allocates memory and
sleeps), run 4 at a time on a "machine" with a memory budget of at most 2 GiB (a quarter of
this machine's available memory if that is less).

- Memory-blind (as `xargs -P4` or a plain process pool): 4 jobs at a time in the order given.
  To keep your real machine safe, a watchdog here plays the kernel's out-of-memory killer:
  when the jobs together use more than the budget, it kills the largest one.
- mpmsub: the same jobs, each declaring its memory, under the same budget.

Usage: python examples/benchmark_demo.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Tuple

import psutil

import mpmsub

MB = 2**20
SLOTS = 4
JOB = """\
import sys, time
data = bytearray(int(sys.argv[1]) * 2**20)
time.sleep(float(sys.argv[2]))
"""


def make_batch(budget_mb: int, scale: float) -> List[Tuple[str, int, float]]:
    """(name, MB used, seconds) per job, small ones first; the declared m adds 20% to the use."""
    kinds = [("small", 12, 0.05, 0.5), ("medium", 6, 0.25, 1.5), ("big", 3, 0.55, 2.0)]
    return [
        (f"{name}{i}", int(budget_mb * share), hold * scale) for name, count, share, hold in kinds for i in range(count)
    ]


class OomKiller:
    """Kills the largest of this process's children whenever together they use more than `budget`."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.peak = 0
        self.kills = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> OomKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.02):
            sizes = []
            for proc in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    sizes.append((proc.memory_info().rss, proc.pid))
            total = sum(rss for rss, _ in sizes)
            self.peak = max(self.peak, total)
            if total > self.budget and sizes:
                try:
                    os.kill(max(sizes)[1], signal.SIGKILL)
                    self.kills += 1
                except OSError:
                    pass


def run_blind(script: str, batch: List[Tuple[str, int, float]], budget_mb: int) -> Tuple[int, float]:
    def one(job: Tuple[str, int, float]) -> int:
        _, used, hold = job
        return subprocess.run([sys.executable, script, str(used), str(hold)]).returncode

    with OomKiller(budget_mb * MB):
        started = time.perf_counter()
        with ThreadPoolExecutor(SLOTS) as pool:
            codes = list(pool.map(one, batch))
        wall = time.perf_counter() - started
    return sum(code != 0 for code in codes), wall


def run_mpmsub(script: str, batch: List[Tuple[str, int, float]], budget_mb: int) -> Tuple[int, float, float]:
    cluster = mpmsub.cluster(p=SLOTS, m=f"{budget_mb}M", verbose=False, progress_bar=False)
    for name, used, hold in batch:
        m = f"{int(used * 1.2) + 30}M"  # what the job uses, a margin, and the interpreter itself
        cluster.jobs.append({"cmd": [sys.executable, script, str(used), str(hold)], "p": 1, "m": m, "id": name})
    with OomKiller(budget_mb * MB) as watchdog:
        started = time.perf_counter()
        cluster.run()
        wall = time.perf_counter() - started
    return len(cluster.failed_jobs), wall, watchdog.peak / MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller, shorter batch (a few seconds)")
    args = parser.parse_args()
    available = psutil.virtual_memory().available // MB
    budget_mb = min(512 if args.quick else 2048, available // 4)
    batch = make_batch(budget_mb, 0.2 if args.quick else 1.0)
    print(f"{len(batch)} jobs, {SLOTS} at a time, memory budget {budget_mb} MB")
    with tempfile.TemporaryDirectory() as tmp:
        script = str(Path(tmp) / "job.py")
        Path(script).write_text(JOB)
        killed, blind_wall = run_blind(script, batch, budget_mb)
        print(f"memory-blind: {killed} of {len(batch)} jobs killed for memory, {blind_wall:.1f} s")
        failed, wall, peak = run_mpmsub(script, batch, budget_mb)
        print(
            f"mpmsub:       {len(batch) - failed} of {len(batch)} jobs succeeded, {wall:.1f} s "
            f"(the jobs together peaked at {peak:.0f} MB)"
        )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

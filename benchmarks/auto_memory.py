"""Learned memory: m="auto" against an oracle.

A batch of 40 jobs of one program whose memory grows with its input (tests/support/sized_tool.py: 10M
plus 10M per MB of input), on input files of four sizes made here (4, 14, 39 and 79 MB: 50, 150,
400 and 800 MB of need), 10 of each, interleaved, under a 2 GB budget on 2 CPUs, three ways in
one run:

  (a) oracle: each job's m is its need plus 16M (what the interpreter itself takes);
  (b) m="auto" with an empty history: the first job is a probe, the rest are estimated;
  (c) m="auto" again, with the history (b) left.

Reported: each makespan over (a)'s, the jobs that failed, the runs stopped for memory, and the
peak of the sampled resident memory of all the jobs together. Targets: (b) <= 1.3x with every
job succeeding, (c) <= 1.1x with no memory stop, and the sampled total never above the budget.
With --runs N the batch runs N times (a, b, c each time, (b) on a fresh history) and the
median ratios are reported.

Usage: python benchmarks/auto_memory.py [--runs 3] [--record]
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).parent))

from _common import Figure, TreeSampler, arguments, median, show

import mpmsub
from mpmsub._learn.history import History

MB = 2**20
TOOL = Path(__file__).parent.parent / "tests" / "support" / "sized_tool.py"
INPUT_MB = (4, 14, 39, 79)  # needs of 50, 150, 400 and 800 MB
PER_MB, BASE, HOLD = 10, 10, 0.4
JOBS_PER_SIZE = 10
BUDGET = "2G"
CPUS = 2


def make_batch(where: Path) -> List[Tuple[List[str], int]]:
    """The 40 jobs (argv, need in MB), interleaved by a fixed shuffle."""
    batch = []
    for mb in INPUT_MB:
        path = where / f"input_{mb}mb.dat"
        path.write_bytes(b"\0" * (mb * MB))
        argv = [sys.executable, str(TOOL), str(path), "--base", str(BASE), "--per-mb", str(PER_MB), "--hold", str(HOLD)]
        batch += [(argv, BASE + mb * PER_MB)] * JOBS_PER_SIZE
    random.Random(7).shuffle(batch)
    return batch


def run(batch: List[Tuple[List[str], int]], history: Optional[str]) -> Dict[str, float]:
    """One way of running the batch: the oracle's m when `history` is None, else m="auto"."""
    jobs = []
    for argv, need in batch:
        job = mpmsub.Job(argv)
        jobs.append(job.memory(f"{need + 16}M") if history is None else job.memory("auto"))
    with TreeSampler() as sampler:
        started = time.perf_counter()
        with mpmsub.MemoryAwareExecutor(cpus=CPUS, memory=BUDGET, history=history or False) as executor:
            results = [future.result() for future in [executor.submit(job) for job in jobs]]
        makespan = time.perf_counter() - started
    return {
        "makespan": makespan,
        "failed": sum(not r.success for r in results),
        "memory_stops": sum(r.attempts - 1 for r in results),
        "peak": sampler.peak / MB,
        "requested": sum((r.memory_requested or 0) for r in results) / len(results),
    }


def measure(runs: int = 3) -> List[Figure]:
    budget_mb = 2048
    ratios_b, ratios_c, peaks = [], [], []
    failed_b = stops_c = 0
    rows = []
    with tempfile.TemporaryDirectory() as where:
        batch = make_batch(Path(where))
        for index in range(runs):
            db = str(Path(where) / f"history-{index}.db")
            a = run(batch, None)
            b = run(batch, db)
            c = run(batch, db)
            ratios_b.append(b["makespan"] / a["makespan"])
            ratios_c.append(c["makespan"] / a["makespan"])
            peaks.append(max(a["peak"], b["peak"], c["peak"]))
            failed_b += int(b["failed"])
            stops_c += int(c["memory_stops"])
            for name, way in (("(a) oracle m", a), ("(b) auto, empty history", b), ("(c) auto, (b)'s history", c)):
                rows.append(
                    f"| {index + 1} | {name} | {way['makespan']:.2f} s | {way['makespan'] / a['makespan']:.2f}x "
                    f"| {int(way['failed'])} | {int(way['memory_stops'])} | {way['requested']:.0f} MB "
                    f"| {way['peak']:.0f} MB |"
                )
            with History(db) as history:
                runs_kept = len(list(history.rows()))
            rows.append(f"| {index + 1} | history rows after (b) and (c) | {runs_kept} | | | | | |")
    detail = [
        f"40 jobs of `sized_tool.py` (needs of 50, 150, 400, 800 MB, 10 each), {BUDGET} budget, {CPUS} CPUs",
        "",
        "| run | way | makespan | over (a) | failed | memory stops | mean m | sampled peak, all jobs |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    b, c, peak = median(ratios_b), median(ratios_c), max(peaks)
    return [
        Figure(
            "auto, empty history",
            f"{b:.2f}x oracle, {failed_b} failed",
            "<= 1.3, none failed",
            b <= 1.3 and failed_b == 0,
            detail,
        ),
        Figure(
            "auto, with history",
            f"{c:.2f}x oracle, {stops_c} memory stops",
            "<= 1.1, none",
            c <= 1.1 and not stops_c,
            [],
        ),
        Figure("auto: sampled total", f"{peak:.0f} MB at most", f"<= {budget_mb} MB", peak <= budget_mb, []),
    ]


def main() -> None:
    args = arguments(__doc__, runs=3).parse_args()
    show("Learned memory (m=auto)", measure(args.runs), args.record)


if __name__ == "__main__":
    main()

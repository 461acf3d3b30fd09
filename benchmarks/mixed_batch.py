"""Mixed memory-bound batch: makespan against its lower bound, under a 2 GiB budget on 4 slots.

Jobs of three sizes, each a Python program that allocates its memory and sleeps:
4 big (1100 MB used, m=1200M, 2.0 s: no two fit together), 4 medium (500 MB, m=600M, 1.5 s) and
10 small (100 MB, m=150M, 0.5 s), added small ones first (the order that hurts FIFO). Each job
declares 1 CPU; the executor has 4 (the jobs mostly sleep).

The lower bound is the largest of: the chain of big jobs (their runtimes added up), total
declared memory x runtime / budget, and total CPUs x runtime / CPUs, from the runtimes measured
in the mpmsub "pack" run. Every run is also sampled (every 20 ms, all descendant processes
together) to check that actual memory stayed within the budget.

Runs: mpmsub with schedule="pack" (the cluster's default), mpmsub with FIFO first fit
(schedule="greedy"), and memory-blind `xargs -P4` in the same submission order.
Target: pack at most 1.10x the lower bound, its sampled memory never over the budget.
Usage: python benchmarks/mixed_batch.py [--record]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).parent))

from _common import Figure, TreeSampler, arguments, show

import mpmsub

MB = 2**20
BUDGET_MB = 2048
SLOTS = 4
# name, count, MB allocated, m declared (MB), seconds held
KINDS = [("small", 10, 100, 150, 0.5), ("medium", 4, 500, 600, 1.5), ("big", 4, 1100, 1200, 2.0)]

JOB = """\
import sys, time
data = bytearray(int(sys.argv[1]) * 2**20)  # zero-filled: every page touched
time.sleep(float(sys.argv[2]))
"""


def batch(script: str) -> List[Tuple[str, List[str], int]]:
    """(id, argv, m in MB) for every job, small ones first."""
    jobs = []
    for name, count, used, declared, hold in KINDS:
        for i in range(count):
            jobs.append((f"{name}{i}", [sys.executable, script, str(used), str(hold)], declared))
    return jobs


def run_mpmsub(script: str, schedule: str) -> Tuple[float, int, List[mpmsub.JobResult]]:
    cluster = mpmsub.cluster(p=SLOTS, m=f"{BUDGET_MB}M", verbose=False, progress_bar=False, schedule=schedule)
    for job_id, argv, declared in batch(script):
        cluster.jobs.append({"cmd": argv, "p": 1, "m": f"{declared}M", "id": job_id})
    with TreeSampler() as sampler:
        started = time.perf_counter()
        cluster.run()
        wall = time.perf_counter() - started
    if cluster.failed_jobs:
        raise RuntimeError(f"jobs failed: {[r.error for r in cluster.failed_jobs]}")
    return wall, sampler.peak, cluster.completed_jobs


def run_xargs(script: str) -> Tuple[float, int, int]:
    lines = "".join(f"{argv[2]} {argv[3]}\n" for _, argv, _ in batch(script))
    with TreeSampler() as sampler:
        started = time.perf_counter()
        done = subprocess.run(["xargs", f"-P{SLOTS}", "-n2", sys.executable, script], input=lines.encode())
        wall = time.perf_counter() - started
    return wall, sampler.peak, done.returncode


def lower_bound(results: List[mpmsub.JobResult]) -> Dict[str, float]:
    chain = sum(r.runtime for r in results if r.job_id.startswith("big"))
    memory = sum((r.memory_requested or 0) * r.runtime for r in results) / BUDGET_MB
    cpu = sum(r.cpus * r.runtime for r in results) / SLOTS
    return {"chain of big jobs": chain, "memory x time / budget": memory, "CPU x time / CPUs": cpu}


def measure() -> Figure:
    with tempfile.TemporaryDirectory() as tmp:
        script = str(Path(tmp) / "job.py")
        Path(script).write_text(JOB)
        pack_wall, pack_peak, results = run_mpmsub(script, "pack")
        greedy_wall, greedy_peak, _ = run_mpmsub(script, "greedy")
        xargs_wall, xargs_peak, xargs_rc = run_xargs(script)
    bounds = lower_bound(results)
    bound = max(bounds.values())
    ratio = pack_wall / bound
    within = pack_peak <= BUDGET_MB * MB
    detail = [
        f"Mixed batch: {', '.join(f'{n} {k} ({u} MB, m={d}M, {h} s)' for k, n, u, d, h in KINDS)}; "
        f"budget {BUDGET_MB} MB, {SLOTS} slots, small jobs added first.",
        "",
        "lower bound: " + ", ".join(f"{k} {v:.2f} s" for k, v in bounds.items()) + f" -> **{bound:.2f} s**",
        "",
        "| run | makespan / lower bound | sampled peak memory / budget | jobs |",
        "|---|---|---|---|",
        f'| mpmsub, schedule="pack" | **{ratio:.3f}** | {pack_peak / MB / BUDGET_MB:.2f} | all succeeded |',
        f'| mpmsub, FIFO first fit ("greedy") | {greedy_wall / bound:.3f} | {greedy_peak / MB / BUDGET_MB:.2f} '
        "| all succeeded |",
        f"| xargs -P{SLOTS} (memory-blind) | {xargs_wall / bound:.3f} | {xargs_peak / MB / BUDGET_MB:.2f} "
        f"| exit status {xargs_rc} |",
    ]
    value = f"{ratio:.3f}x the lower bound, peak {pack_peak / MB / BUDGET_MB:.2f}x budget"
    return Figure("mixed batch, pack", value, "<= 1.10, peak <= budget", ratio <= 1.10 and within, detail)


def main() -> None:
    args = arguments(__doc__, runs=1).parse_args()
    show("Mixed memory-bound batch", [measure()], args.record)


if __name__ == "__main__":
    main()

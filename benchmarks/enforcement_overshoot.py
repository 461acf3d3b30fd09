"""Enforcement overshoot: how far past the budget a job growing 100 MB per 100 ms takes the total.

A liar (declares 200M, grows to 1.5G in 100 MB steps) runs beside an honest job (declares 300M,
holds 250M) under a 1G budget. A sampler in this script sums both trees' RSS every 20 ms. Prints
the sampled peak minus the budget (target: at most a few hundred MB) for each run.
Usage: python benchmarks/enforcement_overshoot.py [--runs 3] [--record]
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path
from typing import List

import psutil

sys.path.insert(0, str(Path(__file__).parent))

from _common import arguments, report

import mpmsub

MB = 2**20


def grower(total_mb: int, step_mb: int, hold: float, marker: str) -> List[str]:
    code = (
        "import time\nchunks = []\n"
        f"while sum(map(len, chunks)) < {total_mb} * 2**20:\n"
        f"    chunks.append(bytearray({step_mb} * 2**20))\n    time.sleep(0.1)\n"
        f"time.sleep({hold})\n"
    )
    return [sys.executable, "-c", code, marker]


def one_run() -> float:
    marker = uuid.uuid4().hex
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            total = 0
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                try:
                    if marker in (proc.info["cmdline"] or []):
                        total += proc.info["memory_info"].rss
                except (psutil.Error, TypeError):
                    pass
            peak = max(peak, total)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with mpmsub.MemoryAwareExecutor(cpus=2, memory="1G", memory_reserve=0) as ex:
            honest = ex.submit(mpmsub.Job(grower(250, 250, 3.0, marker)).memory("300M"))
            time.sleep(0.3)
            liar = ex.submit(mpmsub.Job(grower(1500, 100, 1.0, marker)).memory("200M"))
            if liar.result().failure != "memory" or not honest.result().success:
                raise RuntimeError("the liar was not stopped, or the honest job failed")
    finally:
        stop.set()
        sampler.join()
    return peak / MB - 1024


def main() -> None:
    args = arguments(__doc__, runs=3).parse_args()
    overs = [one_run() for _ in range(args.runs)]
    lines = [
        "| run | sampled total past the 1G budget |",
        "|---|---|",
        *[f"| {i + 1} | {over:+.0f} MB |" for i, over in enumerate(overs)],
        "",
        f"**worst overshoot: {max(overs):+.0f} MB** (target: at most a few hundred MB)",
    ]
    report("Enforcement overshoot (liar growing 100 MB / 100 ms beside an honest job, 1G budget)", lines, args.record)


if __name__ == "__main__":
    main()

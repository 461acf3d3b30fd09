"""Monitoring cost: CPU time of the executor's own process while 8 `sleep 5` jobs run.

The CPU time this process uses (all its threads: the event loop, the monitor sampling every
0.1 s, the callers' waits; the jobs' own CPU is not counted), from the first submit to the last
result, divided by the wall time. Target: under 2% of one core.
Usage: python benchmarks/monitor_cost.py [--runs 1] [--record]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import Figure, arguments, show

import mpmsub


def one_run(jobs: int = 8, seconds: float = 5.0) -> float:
    with mpmsub.MemoryAwareExecutor(cpus=jobs, memory="4G") as ex:
        cpu, wall = time.process_time(), time.perf_counter()
        futures = [ex.submit(["sleep", str(seconds)]) for _ in range(jobs)]
        for f in futures:
            if not f.result().success:
                raise RuntimeError(f.result().error)
        return (time.process_time() - cpu) / (time.perf_counter() - wall)


def measure(runs: int = 1) -> Figure:
    fractions = [one_run() for _ in range(runs)]
    worst = max(fractions)
    detail = [
        "| run | executor CPU time / wall time, 8 `sleep 5` jobs |",
        "|---|---|",
        *[f"| {i + 1} | {f * 100:.2f}% |" for i, f in enumerate(fractions)],
    ]
    return Figure("monitoring cost", f"{worst * 100:.2f}% of a core", "< 2%", worst < 0.02, detail)


def main() -> None:
    args = arguments(__doc__, runs=1).parse_args()
    show("Monitoring cost", [measure(args.runs)], args.record)


if __name__ == "__main__":
    main()

"""Dispatch overhead: N `true` jobs on 2 slots through mpmsub, against `xargs -P2` in the same run.

Prints the ratio of medians (mpmsub / xargs). Target: at most 1.3.
Usage: python benchmarks/dispatch_overhead.py [--jobs 1000] [--runs 5] [--record]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import Figure, arguments, interleaved, per_job_table, show, xargs_true

import mpmsub


def run_mpmsub(n: int, slots: int) -> None:
    with mpmsub.MemoryAwareExecutor(cpus=slots, memory="1G") as ex:
        futures = [ex.submit(["true"]) for _ in range(n)]
        for f in futures:
            if not f.result().success:
                raise RuntimeError(f.result().error)


def measure(jobs: int = 1000, runs: int = 5) -> Figure:
    slots = 2
    times = interleaved(
        runs, {f"xargs -P{slots}": lambda: xargs_true(jobs, slots), "mpmsub": lambda: run_mpmsub(jobs, slots)}
    )
    ratio = times["mpmsub"] / times[f"xargs -P{slots}"]
    detail = per_job_table(f"{jobs} `true` jobs, {slots} slots", runs, jobs, list(times.items()))
    return Figure("dispatch overhead", f"{ratio:.2f}x xargs -P{slots}", "<= 1.3", ratio <= 1.3, detail)


def main() -> None:
    parser = arguments(__doc__, runs=5)
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    show("Dispatch overhead", [measure(args.jobs, args.runs)], args.record)


if __name__ == "__main__":
    main()

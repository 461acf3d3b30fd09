"""What a trace costs: the same batches with and without `trace=`, run alternately.

1. 1000 `true` jobs on 2 slots: time with a trace / without (target <= 1.10).
2. 10,000 calls of a trivial function on 2 workers: time with a trace / without (<= 1.10).
3. The size of that 10,000-call trace, per run, and the time and size of its HTML report
   (figures included when matplotlib is installed).

Usage: python benchmarks/trace_cost.py [--runs 5] [--record]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).parent))

from _common import Figure, arguments, median, show

import mpmsub


def trivial(x: int) -> int:
    return x + 1


def commands(jobs: int, trace: Optional[Path]) -> float:
    t0 = time.perf_counter()
    with mpmsub.MemoryAwareExecutor(max_workers=2, memory="4G", trace=trace) as ex:
        futures = [ex.submit(["true"]) for _ in range(jobs)]
        if not all(f.result().success for f in futures):
            raise RuntimeError("a `true` job failed")
    return time.perf_counter() - t0


def calls(count: int, trace: Optional[Path]) -> float:
    with mpmsub.MemoryAwareExecutor(max_workers=2, memory="4G", trace=trace) as ex:
        ex.submit(trivial, 0).result()  # both ways pay the workers' start outside the timing
        ex.submit(trivial, 0).result()
        t0 = time.perf_counter()
        futures = [ex.submit(trivial, i) for i in range(count)]
        for f in futures:
            f.result()
        return time.perf_counter() - t0


def compare(name: str, runs: int, once: object, unit: str) -> Figure:
    run = once  # (trace or None) -> seconds
    plain: List[float] = []
    traced: List[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            # Alternately, so that both see the same machine load, and each first half the time:
            # the second of two runs in a row is measured some 7% slower (an A/A comparison
            # without a trace showed it; the garbage of the first, collected in the second).
            for trace in (None, Path(tmp) / "trace.jsonl")[:: 1 if i % 2 == 0 else -1]:
                (plain if trace is None else traced).append(run(trace))  # type: ignore[operator]
    ratio = median(traced) / median(plain)
    detail = [
        f"| {unit} | median of {runs}, no trace | with a trace | ratio |",
        "|---|---|---|---|",
        f"| {name} | {median(plain):.3f} s | {median(traced):.3f} s | {ratio:.3f} |",
    ]
    return Figure(f"trace cost: {name}", f"{ratio:.2f}x without a trace", "<= 1.10", ratio <= 1.10, detail)


def size(count: int = 10_000) -> Figure:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        calls(count, trace)
        runs = count + 2
        trace_bytes = trace.stat().st_size
        t0 = time.perf_counter()
        figures = mpmsub.write_report(trace, Path(tmp) / "report.html")
        seconds = time.perf_counter() - t0
        html_bytes = os.path.getsize(Path(tmp) / "report.html")
    detail = [
        "| 10,002 calls (two to start the workers) | trace | per run | report | report written in |",
        "|---|---|---|---|---|",
        f"| {'with figures' if figures else 'tables only'} | {trace_bytes / 2**20:.2f} MiB "
        f"| {trace_bytes / runs:.0f} B | {html_bytes / 2**10:.0f} KiB | {seconds:.2f} s |",
    ]
    per_run = trace_bytes / runs
    return Figure("trace size", f"{per_run:.0f} bytes per run", "<= 500", per_run <= 500, detail)


def measure(runs: int = 5) -> List[Figure]:
    return [
        compare("1000 `true` jobs", runs, lambda trace: commands(1000, trace), "2 slots"),
        compare("10,000 calls", runs, lambda trace: calls(10_000, trace), "2 workers"),
        size(),
    ]


def main() -> None:
    args = arguments(__doc__, runs=5).parse_args()
    show("Trace cost", measure(args.runs), args.record)


if __name__ == "__main__":
    main()

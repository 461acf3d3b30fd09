"""Python calls: mpmsub's worker pool against ProcessPoolExecutor(2) in the same run, and the
accuracy of each call's own peak in a reused worker.

1. `map(fn, range(20000), chunksize=200)` of a trivial function: median time / ProcessPoolExecutor's
   (target <= 1.5).
2. 1000 `submit(fn, i)` of a trivial function, then every result: median time / ProcessPoolExecutor's
   (target <= 2).
   Both executors are created and warmed up (their 2 workers started) before the timed runs,
   which alternate between them; the time to create an executor and start its workers is
   printed beside (ProcessPoolExecutor forks its workers where fork is the default; mpmsub's
   start as fresh interpreters, which a threaded parent needs).
3. One worker runs a call that allocates 1 GB, then one that allocates 300 MB: the second's
   reported peak / 300 MB (target within 10%; the figure includes the worker's interpreter,
   about 20 MB). A per-process high-water mark would say 1 GB for both.

Usage: python benchmarks/calls.py [--runs 7] [--record]
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Callable, List

sys.path.insert(0, str(Path(__file__).parent))

from _common import Figure, arguments, median, show

import mpmsub

ITEMS, CHUNK, SUBMITS = 20000, 200, 1000


def trivial(x: int) -> int:
    return x


def allocate(mb: int) -> int:
    block = bytearray(mb * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return len(block)


def run_map(ex: Executor) -> float:
    started = time.perf_counter()
    total = sum(ex.map(trivial, range(ITEMS), chunksize=CHUNK))
    assert total == ITEMS * (ITEMS - 1) // 2
    return time.perf_counter() - started


def run_submits(ex: Executor) -> float:
    started = time.perf_counter()
    futures = [ex.submit(trivial, i) for i in range(SUBMITS)]
    assert sum(f.result() for f in futures) == SUBMITS * (SUBMITS - 1) // 2
    return time.perf_counter() - started


def started(make: Callable[[], Executor]) -> tuple[Executor, float]:
    """An executor with its workers up, and how long that took."""
    t0 = time.perf_counter()
    ex = make()
    list(ex.map(trivial, range(100), chunksize=10))
    return ex, time.perf_counter() - t0


def measure_throughput(runs: int = 7) -> List[Figure]:
    theirs, their_start = started(lambda: ProcessPoolExecutor(2))
    ours, our_start = started(lambda: mpmsub.MemoryAwareExecutor(max_workers=2))
    times: dict[str, List[float]] = {"map ppe": [], "map mpmsub": [], "submit ppe": [], "submit mpmsub": []}
    try:
        for _ in range(runs):  # alternating, so that both see the same machine load
            times["map ppe"].append(run_map(theirs))
            times["map mpmsub"].append(run_map(ours))
            times["submit ppe"].append(run_submits(theirs))
            times["submit mpmsub"].append(run_submits(ours))
    finally:
        theirs.shutdown()
        ours.shutdown()
    m = {key: median(values) for key, values in times.items()}
    map_ratio = m["map mpmsub"] / m["map ppe"]
    submit_ratio = m["submit mpmsub"] / m["submit ppe"]
    detail = [
        f"| Python calls, 2 workers | median of {runs} | ProcessPoolExecutor(2) | ratio |",
        "|---|---|---|---|",
        f"| map, {ITEMS} items, chunksize {CHUNK} | {m['map mpmsub'] * 1e3:.1f} ms | {m['map ppe'] * 1e3:.1f} ms "
        f"| {map_ratio:.2f} |",
        f"| {SUBMITS} submit() + result() | {m['submit mpmsub'] * 1e3:.1f} ms | {m['submit ppe'] * 1e3:.1f} ms "
        f"| {submit_ratio:.2f} |",
        f"| executor created, 2 workers started (once) | {our_start * 1e3:.0f} ms | {their_start * 1e3:.0f} ms | - |",
    ]
    return [
        Figure(
            "calls: map, chunksize 200", f"{map_ratio:.2f}x ProcessPoolExecutor", "<= 1.5", map_ratio <= 1.5, detail
        ),
        Figure("calls: 1000 submits", f"{submit_ratio:.2f}x ProcessPoolExecutor", "<= 2", submit_ratio <= 2.0, []),
    ]


def measure_accuracy() -> Figure:
    with mpmsub.MemoryAwareExecutor(max_workers=1, memory="4G") as ex:
        big = ex.submit(allocate, 1024)
        small = ex.submit(allocate, 300)
        big.result(), small.result()
    assert big.usage is not None and small.usage is not None
    ratio = small.usage.memory_used / 300
    detail = [
        "| one worker: 1 GB call, then 300 MB call | reported peak |",
        "|---|---|",
        f"| the 1 GB call | {big.usage.memory_used:.0f} MB |",
        f"| the 300 MB call | {small.usage.memory_used:.0f} MB ({ratio:.2f}x 300 MB) |",
    ]
    ok = abs(ratio - 1) <= 0.10
    return Figure("calls: per-call peak after a 1 GB call", f"{ratio:.2f}x 300 MB", "within 10%", ok, detail)


def measure(runs: int = 7) -> List[Figure]:
    return [*measure_throughput(runs), measure_accuracy()]


def main() -> None:
    args = arguments(__doc__, runs=7).parse_args()
    show("Python calls", measure(args.runs), args.record)


if __name__ == "__main__":
    main()

"""Run the scheduling and performance benchmarks in one go; print a table and append it to
benchmarks/RESULTS.md (unless --no-record).

1. mixed memory-bound batch: makespan / lower bound (target <= 1.10, memory within budget)
2. dispatch overhead: 1000 `true` jobs on 2 slots / xargs -P2 (target <= 1.3)
3. scaling: per-job cost at 20,000 / at 500 jobs through the executor, the cluster API and
   `mpmsub run` (<= 1.15 each); 100,000 queued submits (< 2 s, < 200 MB);
   shutdown(cancel_futures=True) of them (< 1 s)
4. monitoring cost: executor CPU / wall while 8 `sleep 5` jobs run (< 2% of a core)
5. measurement accuracy: reported peak / the kernel's max RSS for a 300 MB program held 0.05,
   0.3 and 2 s (within 10%) and a shell running two 200 MB programs at once (within 15% of the sum)
6. Python calls: map(20000 items, chunksize 200) / ProcessPoolExecutor(2) (<= 1.5); 1000 submits
   / ProcessPoolExecutor(2) (<= 2); a 300 MB call's peak after a 1 GB call in the same worker
   (within 10% of 300 MB)
7. start-up, each run a fresh process: `import mpmsub` (<= 70 ms); a cold map(20000 items) with
   2 workers / ProcessPoolExecutor with fork (<= 2), forkserver and spawn (< 1 each); executor
   created and 2 workers ready (<= 40 ms); 1000 `true` jobs as a whole `python -c` process
   (<= 1.4) and through `mpmsub run` (<= 1.8) / xargs -P2

Exits with status 1 if a target is missed. Takes about a minute and a half.
Usage: python benchmarks/run_all_benchmarks.py [--no-record]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import accuracy
import calls
import dispatch_overhead
import mixed_batch
import monitor_cost
import scaling
import startup
from _common import show


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-record", action="store_true", help="do not append the figures to RESULTS.md")
    args = parser.parse_args()
    started = time.perf_counter()
    figures = [
        mixed_batch.measure(),
        dispatch_overhead.measure(),
        *scaling.measure(),
        monitor_cost.measure(),
        *accuracy.measure(),
        *calls.measure(),
        *startup.measure(),
    ]
    show("All benchmarks", figures, keep=not args.no_record)
    print(f"\n{sum(f.ok for f in figures)} of {len(figures)} targets met in {time.perf_counter() - started:.0f} s")
    return 0 if all(f.ok for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())

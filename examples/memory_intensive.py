"""Memory-constrained scheduling: more memory asked for than the budget holds at once.

Eight jobs of 250-600 MB under a 1.2 GB budget on 4 CPU slots. A memory-blind runner would start
four at once (up to 2.4 GB); mpmsub keeps the reservations of the running jobs within 1.2 GB, and
this script checks it from the measured start and end times.

Run it with:  python examples/memory_intensive.py
"""

from __future__ import annotations

import sys

import mpmsub

SIZES = [600, 250, 500, 250, 600, 400, 250, 500]  # MB each job allocates
BUDGET_MB = 1200


def main() -> None:
    p = mpmsub.cluster(p=4, m=f"{BUDGET_MB}M", verbose=False)
    for i, mb in enumerate(SIZES):
        code = f"import time; b = bytearray({mb} * 2**20); time.sleep(0.6)"
        p.jobs.append({"cmd": [sys.executable, "-c", code], "p": 1, "m": f"{mb + 50}M", "id": f"alloc-{mb}-{i}"})
    p.run()
    p.print_summary()

    results = p.completed_jobs
    worst = 0.0
    for r in results:  # the reservations in force at each job's start
        moment = r.start_time + 1e-3
        worst = max(worst, sum(o.memory_requested or 0 for o in results if o.start_time <= moment < o.end_time))
    print(f"\nlargest reservation in force at any job start: {worst:.0f} MB (budget {BUDGET_MB} MB)")
    assert worst <= BUDGET_MB


if __name__ == "__main__":
    main()

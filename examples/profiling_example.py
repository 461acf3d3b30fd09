"""Profiling: measure what jobs really use, then schedule them with the recommendations.

profile() runs the queued jobs one at a time and prints each one's peak memory and a
recommended `m` (the peak + 20%), with a snippet ready to paste.

Run it with:  python examples/profiling_example.py
"""

from __future__ import annotations

import sys

import mpmsub


def allocate(mb: int) -> list[str]:
    return [sys.executable, "-c", f"import time; b = bytearray({mb} * 2**20); time.sleep(0.2)"]


def main() -> None:
    p = mpmsub.cluster(p=2, m="2G", verbose=False)
    for mb in (80, 160, 320):
        p.jobs.append({"cmd": allocate(mb), "id": f"needs-{mb}M"})  # memory unknown: no m
    results = p.profile()

    # Use the measurements: a second batch of the same jobs with recommended reservations
    p2 = mpmsub.cluster(p=2, m="2G", verbose=False)
    for r in results:
        p2.jobs.append({"cmd": r.cmd, "p": 1, "m": mpmsub.recommend_memory(r.memory_used), "id": r.job_id})
    stats = p2.run()
    print(
        f"\nsecond run: {stats['jobs']['completed']}/{stats['jobs']['total']} succeeded, "
        f"{stats['memory']['requested_mb']:.0f} MB reserved in all"
    )


if __name__ == "__main__":
    main()

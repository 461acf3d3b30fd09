"""The seed API in one batch: jobs with different memory needs under a memory budget.

Each job is a small Python program that allocates memory, holds it and exits. The cluster starts
a job only when its declared memory fits beside the running jobs' reservations, so the two 600 MB
jobs never run together under the 1 GB budget while the small ones fill the gaps.

Run it with:  python examples/basic_example.py
"""

from __future__ import annotations

import sys

import mpmsub


def allocate(mb: int, seconds: float) -> list[str]:
    """A real command: allocate `mb` MB, hold it for `seconds`, say so."""
    return [sys.executable, "-c", f"import time; b = bytearray({mb} * 2**20); time.sleep({seconds}); print({mb})"]


def main() -> None:
    p = mpmsub.cluster(p=2, m="1G")
    p.describe_resources()
    print()
    p.jobs.append({"cmd": allocate(600, 1.0), "p": 1, "m": "700M", "id": "large-1"})
    p.jobs.append({"cmd": allocate(600, 1.0), "p": 1, "m": "700M", "id": "large-2"})
    p.jobs.append(mpmsub.Job(allocate(200, 0.5)).cpu(1).memory("250M").with_id("medium-1"))
    p.jobs.append(mpmsub.Job(allocate(200, 0.5)).cpu(1).memory("250M").with_id("medium-2"))
    p.jobs.extend([mpmsub.job(allocate(50, 0.2), p=1, m="100M") for _ in range(4)])
    p.jobs.append({"cmd": ["no-such-program", "--version"]})  # fails cleanly: the batch goes on

    stats = p.run()
    print()
    p.print_summary()
    print(
        f"\n{stats['jobs']['completed']} of {stats['jobs']['total']} jobs succeeded; "
        f"the largest peak was {stats['memory']['peak_job_mb']:.0f} MB under a {stats['cluster']['memory']} budget"
    )


if __name__ == "__main__":
    main()

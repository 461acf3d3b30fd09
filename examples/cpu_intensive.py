"""CPU-bound jobs: each reserves the CPUs it uses, so the machine is never oversubscribed.

Busy loops of one and two threads on this machine's CPUs: two-CPU jobs wait for two free CPUs.

Run it with:  python examples/cpu_intensive.py
"""

from __future__ import annotations

import sys

import mpmsub

BUSY = """
import sys, threading, time
def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
threads = [threading.Thread(target=spin, args=(0.4,)) for _ in range(int(sys.argv[1]))]
for t in threads: t.start()
for t in threads: t.join()
"""


def main() -> None:
    p = mpmsub.cluster(m="1G", verbose=False)  # CPUs: detected
    p.describe_resources()
    for i in range(6):
        cpus = min(2 if i % 3 == 0 else 1, p.max_cpus)
        p.jobs.append(
            mpmsub.Job([sys.executable, "-c", BUSY, str(cpus)]).cpu(cpus).memory("50M").with_id(f"spin{i}x{cpus}")
        )
    stats = p.run()
    p.print_summary()
    print(
        f"\nCPU time {stats['cpu']['cpu_seconds']:.1f} s in {stats['time']['wall']:.1f} s of wall time "
        f"on {p.max_cpus} CPUs"
    )


if __name__ == "__main__":
    main()

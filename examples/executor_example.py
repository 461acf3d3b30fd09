"""A batch of jobs with different memory needs, run under a memory budget.

Each job is a small Python program that allocates some memory, holds it, and exits. The executor
admits a job only when its declared memory fits in what the running jobs have not reserved, so
the 600 MB jobs never run together under the 1 GB budget while the small ones fill the gaps.

Run it with:  python examples/executor_example.py
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import as_completed

import mpmsub


def allocate(mb: int, seconds: float) -> list[str]:
    """A real command: allocate `mb` MB, hold it for `seconds`."""
    code = f"import time; block = bytearray({mb} * 2**20); time.sleep({seconds}); print('held {mb} MB')"
    return [sys.executable, "-c", code]


def main() -> None:
    batch = [
        mpmsub.Job(allocate(600, 1.0)).memory("700M").with_id("large-1"),
        mpmsub.Job(allocate(600, 1.0)).memory("700M").with_id("large-2"),
        mpmsub.Job(allocate(200, 0.6)).memory("250M").with_id("medium-1"),
        mpmsub.Job(allocate(200, 0.6)).memory("250M").with_id("medium-2"),
        mpmsub.Job(allocate(50, 0.3)).memory("100M").with_id("small-1"),
        mpmsub.Job(allocate(50, 0.3)).memory("100M").with_id("small-2"),
        {"cmd": ["sh", "-c", "echo from a shell; exit 0"], "p": 1, "m": "10M", "id": "shell"},
        ["no-such-program", "--help"],  # a missing program is a failed result, not an exception
    ]
    started = time.monotonic()
    started_wall = time.time()
    with mpmsub.MemoryAwareExecutor(cpus=2, memory="1G") as executor:
        print(f"{executor}: {len(batch)} jobs\n")
        futures = [executor.submit(job) for job in batch]
        print(f"{'job':<10} {'ok':<4} {'asked':>7} {'peak':>8} {'runtime':>8}  note")
        for future in as_completed(futures):
            r = future.result()
            asked = f"{r.memory_requested:.0f}M" if r.memory_requested is not None else "-"
            note = r.error if r.error else (r.stdout or "").strip()
            print(
                f"{r.job_id:<10} {'yes' if r.success else 'no':<4} {asked:>7} {r.memory_used:7.1f}M "
                f"{r.runtime:7.2f}s  {note}"
            )
    results = {f.result().job_id: f.result() for f in futures}
    failed = sum(not r.success for r in results.values())
    print(f"\n{len(results) - failed} succeeded, {failed} failed, in {time.monotonic() - started:.1f} s")
    a, b = results["large-1"], results["large-2"]
    overlap = a.start_time < b.end_time and b.start_time < a.end_time
    print(
        f"large-1 ran {a.start_time - started_wall:.1f}-{a.end_time - started_wall:.1f} s, "
        f"large-2 {b.start_time - started_wall:.1f}-{b.end_time - started_wall:.1f} s: "
        f"{'overlapping!' if overlap else 'one after the other'} (together they would exceed the 1G budget; "
        "smaller jobs that fit started in between)"
    )
    assert not overlap


if __name__ == "__main__":
    main()

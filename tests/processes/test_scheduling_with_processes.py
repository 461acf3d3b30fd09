"""The scheduling policy through the executor and the cluster, with real processes."""

from __future__ import annotations

import sys
import time
from typing import Dict, List

import pytest

import mpmsub
from mpmsub import JobResult, MemoryAwareExecutor


def sleep_job(seconds: float, m: str, **kwargs: object) -> mpmsub.Job:
    return mpmsub.job(["sleep", str(seconds)], m=m, **kwargs)  # type: ignore[arg-type]


def wait_running(ex: MemoryAwareExecutor, n: int) -> None:
    deadline = time.monotonic() + 10
    while ex.status().running < n and time.monotonic() < deadline:
        time.sleep(0.01)


def starts(results: Dict[str, JobResult]) -> List[str]:
    return [r.job_id for r in sorted(results.values(), key=lambda r: r.start_time)]


def run_starvation_batch(schedule: str) -> Dict[str, JobResult]:
    """A (600M) runs; the big job B (800M) waits for it; small jobs (300M each) keep coming."""
    with MemoryAwareExecutor(cpus=4, memory="1000M", memory_reserve=0, schedule=schedule) as ex:
        futures = [ex.submit(sleep_job(1.0, "600M", id="A")), ex.submit(sleep_job(0.1, "800M", id="B"))]
        futures += [ex.submit(sleep_job(0.5, "300M", id=f"C{i}")) for i in range(4)]
        return {f.result().job_id: f.result() for f in futures}


def test_fifo_reserves_for_the_head_job_so_small_jobs_cannot_starve_it() -> None:
    results = run_starvation_batch("fifo")
    assert all(r.success for r in results.values())
    assert starts(results)[:2] == ["A", "B"]  # no small job slipped in while B waited


def test_greedy_lets_small_jobs_pass_the_big_one() -> None:
    results = run_starvation_batch("greedy")
    assert starts(results)[:2] == ["A", "C0"] and starts(results)[-1] == "B"


def test_higher_priority_starts_first() -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G", schedule="fifo") as ex:
        futures = [ex.submit(sleep_job(0.3, "1M", id="first"))]
        wait_running(ex, 1)
        futures += [ex.submit(mpmsub.job(["true"], id=f"low{i}")) for i in range(3)]
        futures.append(ex.submit(mpmsub.job(["true"], id="urgent", priority=10)))
        results = {f.result().job_id: f.result() for f in futures}
    assert starts(results) == ["first", "urgent", "low0", "low1", "low2"]


def test_pack_starts_the_largest_memory_first() -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G", schedule="pack") as ex:
        futures = [ex.submit(sleep_job(0.3, "1M", id="first"))]
        wait_running(ex, 1)
        futures += [ex.submit(mpmsub.job(["true"], m=f"{m}M", id=f"m{m}")) for m in (100, 300, 200)]
        futures.append(ex.submit(mpmsub.job(["true"], id="none")))
        results = {f.result().job_id: f.result() for f in futures}
    assert starts(results) == ["first", "m300", "m200", "m100", "none"]


@pytest.mark.parametrize("bad", ["lifo", "", None, 3])
def test_an_unknown_schedule_is_refused_by_name(bad: object) -> None:
    with pytest.raises(ValueError, match=f"unknown schedule {bad!r}"):
        MemoryAwareExecutor(cpus=1, memory="1G", schedule=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"unknown schedule {bad!r}"):
        mpmsub.cluster(p=1, m="1G", schedule=bad)  # type: ignore[arg-type]
    if bad is not None:  # run(schedule=None) keeps the cluster's
        c = mpmsub.cluster(p=1, m="1G", verbose=False, progress_bar=False)
        with pytest.raises(ValueError, match=f"unknown schedule {bad!r}"):
            c.run(schedule=bad)  # type: ignore[arg-type]


def test_cluster_packs_by_memory_then_by_the_runtimes_it_measured() -> None:
    quick = [sys.executable, "-c", "import time; time.sleep(0.05)"]
    slow = [sys.executable, "-c", "import time; time.sleep(0.6)"]
    c = mpmsub.cluster(p=1, m="1G", verbose=False, progress_bar=False)
    assert c.schedule == "pack"
    c.jobs.extend([{"cmd": quick, "id": "quick"}, {"cmd": slow, "id": "slow"}])
    c.profile(verbose=False)  # measures both, in the order given
    c.jobs.extend(
        [
            {"cmd": ["true"], "m": "10M", "id": "small"},
            {"cmd": quick, "m": "100M", "id": "quick2"},
            {"cmd": slow, "m": "100M", "id": "slow2"},
            {"cmd": ["true"], "m": "10M", "id": "first", "priority": 1},
        ]
    )
    c.run()
    order = [r.job_id for r in sorted(c.completed_jobs[2:], key=lambda r: r.start_time)]
    assert order == ["first", "slow2", "quick2", "small"]


def test_cluster_run_can_keep_the_order_given() -> None:
    c = mpmsub.cluster(p=1, m="1G", verbose=False, progress_bar=False, schedule="fifo")
    c.jobs.extend([{"cmd": ["true"], "m": f"{m}M", "id": f"m{m}"} for m in (10, 30, 20)])
    c.run()
    assert [r.job_id for r in sorted(c.completed_jobs, key=lambda r: r.start_time)] == ["m10", "m30", "m20"]

"""The engine's rules for a run, as pure functions of plain data: what follows a run's end
(retry, requeue, or the result is final), how a kill by the kernel's out-of-memory killer is
recognised, the live memory gate, and how m="auto" sizes a job and chooses its key's probe.

No threads, no processes, no clock: the time is passed in. The loop's core (`_core`) gathers the
data, calls these, and carries the decision out; the scheduler, the ledger and the enforcement
rules (`_scheduler`, `_ledger`, `_enforce`) are the other policies.
"""

from __future__ import annotations

import math
from typing import Callable, Deque, Iterable, NamedTuple, Optional, Sequence, Tuple, TypeVar

from mpmsub._policy.enforce import strict_overuse
from mpmsub._result import CANCELLED, KILLED, MEMORY, PICKLE, START
from mpmsub._units import MB, format_memory

PROFILE_BUFFER = 0.20  # the margin profile() adds to a measured peak; a requeued job waits for it too
MAX_REQUEUES = 3  # stops for the machine's sake before a job fails with a memory error
AUTO_RETRIES = 10  # m="auto": runs again with more memory after a memory stop, up to the budget
# How long the kernel's count of available memory may take to show an allocation (measured: up
# to about a second; its per-CPU counters are folded into it once a second).
AVAILABLE_LAG = 1.5

T = TypeVar("T")

# -- after a run's end -------------------------------------------------------------------------


class Ended(NamedTuple):
    """A run that ended, as the retry rule sees it. Sizes in bytes."""

    failure: Optional[str]  # the run's failure kind; None for a success
    peak: int  # the run's peak memory
    memory: Optional[int]  # the job's `m` for that run
    growth: float  # the job's memory_growth: how much more a memory failure's retry gets
    auto: bool  # an m="auto" job: a memory failure of its prediction runs again with more
    auto_retries: int  # such runs so far
    retries_left: int  # the job's own retries not used yet
    requeue: bool  # stopped for the machine's sake, to run again
    requeue_need: int  # the memory its next run waits for, from earlier requeues
    most: int  # the most memory the job can be given
    final: bool = False  # nothing may follow: the executor is terminating, the job was killed, or requeued too often
    after_miss: int = 0  # an m="auto" job's: what its estimate says a miss runs again with at least


class NextRun(NamedTuple):
    """The run that follows: why, with what `m`, and the memory it waits for."""

    why: str  # "requeue" (not the job's failure), "auto" (a prediction too small) or "retry"
    memory: Optional[int]
    requeue_need: int


def next_run(end: Ended) -> Optional[NextRun]:
    """What follows a run's end: a run again (requeued, or retried), or None when its result is
    final. A requeue costs no retry; a memory failure's retry gets more memory (grown_memory)."""
    if end.final:
        return None
    if end.requeue:
        # It was perhaps still growing: its next run waits for room for its peak plus the share
        # profile() adds to a finished job's peak, though not for more than it may be given.
        margin = min(math.ceil(end.peak * (1 + PROFILE_BUFFER)), end.most)
        return NextRun("requeue", end.memory, max(end.requeue_need, end.peak, margin))
    if end.failure is None or end.failure in (START, CANCELLED, KILLED, PICKLE):
        return None
    memory_failure = end.failure == MEMORY
    # A predicted m that proved too little runs again with more, beyond the job's own retries.
    if end.auto and memory_failure and end.auto_retries < AUTO_RETRIES and (end.memory or 0) < end.most:
        why = "auto"
    elif end.retries_left > 0:
        why = "retry"
    else:
        return None
    memory = grown_memory(end) if memory_failure else end.memory
    return NextRun(why, memory, end.requeue_need)


def grown_memory(end: Ended) -> int:
    """The `m` of a memory failure's next run: its `m` (or, without one, its peak) grown by its
    memory_growth, by at least 1 MB; for m="auto", what it reached grown by the estimate's retry
    rule (`retry_memory`: at least its estimate's after_miss); within what it may get."""
    if end.auto:
        from mpmsub._learn.estimate import retry_memory  # (an m="auto" job's: loaded with its history)

        return min(end.most, retry_memory(end.memory or 0, end.peak, end.after_miss))
    base = end.memory if end.memory is not None else end.peak
    return min(end.most, max(base + MB, math.ceil(base * end.growth)))


def grown_gpu_memory(reserved: int, growth: float, largest: Optional[int]) -> Optional[int]:
    """The GPU memory on each device of the next run of a job stopped for its GPU memory (gpu
    strict): grown by its memory_growth, at most the largest device's; None when that device
    already was all it had."""
    if largest is None or reserved >= largest:
        return None
    return min(largest, max(reserved + MB, math.ceil(reserved * growth)))


def shortage_stop(message: str, requeued: int) -> Tuple[str, bool]:
    """A stop for the machine's sake of a job requeued `requeued` times so far: the message, and
    whether this stop is its last (it then fails with a memory error instead of running again)."""
    if requeued < MAX_REQUEUES:
        return message, False
    return message.replace("stopped and requeued", "stopped") + f" ({MAX_REQUEUES} times; giving up)", True


# -- what a run's end means ------------------------------------------------------------------


def sigkilled(returncodes: Sequence[Optional[int]]) -> bool:
    """Whether a process of the job died of SIGKILL (or a shell reported its 137)."""
    return any(rc in (-9, 137) for rc in returncodes)


def oom_failure(
    returncodes: Sequence[Optional[int]],
    failure: Optional[str],
    oom_kills: int,
    peak: int,
    baseline: Optional[int],
    count: Optional[int],
) -> Optional[str]:
    """The memory error of a run the kernel's out-of-memory killer ended, else None.

    It is one where the killer killed one of the job's processes (`oom_kills`, known exactly where
    the job had a memory cgroup), or that died of a SIGKILL mpmsub did not send while the killer
    struck somewhere on the machine (the machine's kill `count` above its `baseline` at the
    run's start; None where that count is not known). A run whose failure is known already, or
    that exited 0 throughout, keeps its outcome.
    """
    if failure is not None or all(rc == 0 for rc in returncodes):
        return None
    used = format_memory(peak)
    if oom_kills:
        if sigkilled(returncodes):
            return f"killed by the kernel's out-of-memory killer (SIGKILL) after using {used}"
        return f"failed after the kernel's out-of-memory killer killed one of its processes; it used {used}"
    if baseline is not None and count is not None and count > baseline and sigkilled(returncodes):
        return f"killed by the kernel's out-of-memory killer (SIGKILL) after using {used}"
    return None


def final_peak_failure(
    strict: bool, memory: Optional[int], failure: Optional[str], peak: Optional[int]
) -> Optional[str]:
    """The memory error of a strict job whose processes' final peak (the kernel's rusage, the
    samples) is above its `m` though no sample stopped it (a short job, or this process stopped
    while it ran): its `m` is a limit, not a guess. None otherwise."""
    if strict and memory is not None and failure is None and peak is not None and peak > memory:
        return strict_overuse(peak, memory, ended=True)
    return None


# -- the live memory gate ------------------------------------------------------------------------


def need(memory: Optional[int], requeue_need: int) -> int:
    """Bytes a job is expected to need: its `m`, or more if a run stopped for the machine's sake was
    seen to use more (with a margin: it may have been still growing)."""
    return max(memory or 0, requeue_need)


def gate_room(available: int, reserve: int, running: Iterable[Tuple[int, int]]) -> int:
    """The memory the gate may hand out: the machine's available memory, less the reserve and
    what the running jobs, as (need, floor) pairs, have reserved (or were seen to need) but are
    not yet sure to show in the machine's figure (their floor)."""
    unrealized = sum(max(0, job_need - floor) for job_need, floor in running)
    return available - reserve - unrealized


def gate_admits(job_need: int, room: int, alone: bool) -> bool:
    """Whether the gate lets a job that needs `job_need` start with `room` left. With nothing of
    the executor's running (or admitted in the same round: `alone`) a job may always start:
    waiting could last forever (for memory the machine never has free), and if the machine then
    runs short, the job is stopped and requeued, and fails after a few tries."""
    return job_need <= room or alone


def floor(window: Deque[Tuple[float, int]], rss: int, now: float, started: float) -> int:
    """Record a sample taken at `now` in `window`; return the least resident size over the last
    AVAILABLE_LAG seconds, or 0 for a run younger than that (its memory may not show in the
    machine's figure yet)."""
    window.append((now, rss))
    while len(window) > 1 and window[1][0] <= now - AVAILABLE_LAG:
        window.popleft()  # keep one sample at or before the start of the window
    if now - started < AVAILABLE_LAG:
        return 0
    return min(sample for _, sample in window)


# -- m="auto" ----------------------------------------------------------------------------------


def most_memory(budget: int, place: Optional[int]) -> int:
    """The most memory a job can be given: the budget, or less where one place of a remote backend
    (a Dask worker, a SLURM node) offers less."""
    return min(budget, place or budget)


def choose_probe(held: Sequence[T], input_size: Callable[[T], int], seq: Callable[[T], int]) -> T:
    """Of a key's held jobs, the one that probes it: the one with the most input (the first
    submitted of those)."""
    return max(held, key=lambda job: (input_size(job), -seq(job)))


def probe_reservation(
    probe_memory: Optional[int], budget: int, cpus: int, total_cpus: int, most: int
) -> Tuple[int, bool]:
    """The memory a probe is queued with, and whether it takes what is free when it starts
    (grabbed_memory): the executor's probe_memory, or its CPUs' share of the budget (never
    starting with nothing when another probe took all), within what it may be given."""
    if probe_memory is not None:
        return min(probe_memory, most), False
    return min(budget * cpus // total_cpus, most), True


def grabbed_memory(reserved: int, free: int, most: int) -> int:
    """A probe's memory as it starts: its reservation and what is free on the ledger besides."""
    return min(reserved + free, most)

"""The estimate `m="auto"` gives a job: its peak memory predicted from past runs of its key (see
docs/auto-memory.md). A pure function of the runs and the job's input size; `_learn.keys` says
which runs are of the same key."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from mpmsub._units import MB

WINDOW = 200  # the most recent runs of a key an estimate looks at
MARGIN = 0.10  # where one input size was seen (or this one before): its highest peak plus 10%...
FLOOR = 16 * MB  # ...and every estimate plus 16M (what a process's start may add, for small tools)
NEIGHBOURS = 12  # a run's neighbours by input size: this many, or NEIGHBOURS_SHARE of the runs...
NEIGHBOURS_SHARE = 0.15
CLOSE = 3  # ...or only the nearest CLOSE on each side (a band of sizes whose peaks differ)...
CLOSE_GAIN = 1.25  # ...where that would have cost the past runs this much less
RISES = 8  # the rises weighed: the most a past run rose above its neighbours, and the next 7
FEW_RUNS = 20  # under this many runs, the most any run rose is the least rise allowed
FIT_RUNS = 30  # the least runs a straight line is weighed against the neighbours from
MISS_COST = 2.0  # the cost of a run the line would have missed, in its allocation x runtime
RETRY_GROWTH = 1.25  # an m="auto" run stopped for memory runs again with its peak times this...
# ...or with the highest peak of its key's recent runs, where that is more (Estimate.after_miss).
# Outcomes whose peak says what the job needed (a memory stop: at least that much). A run that
# was timed out, cancelled, killed by a signal or stopped for its neighbours' sake says little.
LEARNED_FROM = (None, "exit", "memory")


@dataclass(frozen=True)
class Run:
    """A past run of a key: the size of its input files and its peak memory, in bytes, and its
    runtime in seconds (0: unknown), which weighs what a wrong estimate of it would have cost."""

    size: int
    peak: int
    runtime: float = 0.0


@dataclass(frozen=True)
class Estimate:
    """A predicted peak in bytes (margin included), the method that gave it, and the number of
    past runs it was made from.

    Methods: "neighbours" (the runs of the nearest input sizes: their highest peak, following
    their trend upwards, times how far past runs rose above their own neighbours'), "fit" (a
    straight line of peak against input size, raised to cover every run, where it would have
    wasted less on the past runs than the neighbours), "scaled" (one input size seen, and this
    one larger: that run's peak scaled by the ratio of sizes), "highest" (the highest peak seen,
    where sizes do not vary).

    `after_miss`: what a run given this estimate and stopped for memory runs again with at
    least, the highest peak of the runs it was made from (0 where that is not above it): a key
    whose runs sometimes need far more than most is sent there at once, not in steps."""

    memory: int
    method: str
    runs: int
    after_miss: int = 0


def estimate(runs: Sequence[Run], size: int) -> Optional[Estimate]:
    """The memory to reserve for a run with `size` bytes of input, from past `runs` of its key
    (oldest first); None without any. Never below the largest peak of a run with the same input
    size (among all of `runs`, plus the margin), nor below the highest of the last runs where
    sizes do not vary."""
    if not runs:
        return None
    window = runs[-WINDOW:]
    sizes = {run.size for run in window}
    highest = max(run.peak for run in window)
    if len(sizes) >= 2:
        base, method = _from_sizes(sorted(window, key=lambda run: run.size), size, highest)
    else:
        seen = next(iter(sizes))
        if size > seen > 0:
            base, method = highest * size / seen * (1 + MARGIN), "scaled"
        else:
            base, method = highest * (1 + MARGIN), "highest"
    same = max((run.peak for run in runs if run.size == size), default=0)
    memory = math.ceil(max(base, same * (1 + MARGIN))) + FLOOR
    return Estimate(memory, method, len(window), highest if highest > memory else 0)


def retry_memory(allocation: int, peak: int, after_miss: int = 0) -> int:
    """The memory of the next run of an m="auto" job stopped for memory: it had `allocation` and
    was stopped at `peak` (at least its allocation where it was stopped on passing it): what it
    reached, grown by RETRY_GROWTH, not a blind doubling; or its estimate's `after_miss` (the
    highest peak of its key's runs), where that is more."""
    base = max(allocation, peak)
    return max(base + MB, math.ceil(base * RETRY_GROWTH), after_miss)


def _from_sizes(runs: Sequence[Run], size: int, highest: int) -> Tuple[float, str]:
    """The estimate where inputs of two sizes or more were seen (`runs` by input size, `highest`
    their highest peak): the neighbours' or the line's, whichever would have cost the past runs
    less."""
    n = len(runs)
    peaks = [run.peak for run in runs]
    usual = max(NEIGHBOURS, int(NEIGHBOURS_SHARE * n)) // 2
    usual_tops = _tops(peaks, usual)
    usual_rises = _rises(peaks, usual_tops)
    # The usual neighbours with the most but one rise (the most, from few runs) by default; the
    # closest neighbours, or another of the largest rises, where it would have cost the runs
    # CLOSE_GAIN times less (a miss running again as retry_memory says): they are judged on the
    # runs they are chosen from.
    default = usual_rises[0 if n < FEW_RUNS else min(1, n - 1)]
    best = (_cost(runs, [default * top for top in usual_tops], highest), default, usual)
    for half in (CLOSE, usual) if n > 2 * CLOSE else (usual,):
        tops = usual_tops if half == usual else _tops(peaks, half)
        for rise in sorted(set(_rises(peaks, tops)[:RISES])):
            cost = CLOSE_GAIN * _cost(runs, [rise * top for top in tops], highest)
            if cost < best[0]:
                best = (cost, rise, half)
    _, rise, half = best
    at = bisect.bisect_left([run.size for run in runs], size)
    near = runs[max(0, at - half) : at + half] or runs
    slope, _ = _line(near)
    guess = rise * max(run.peak + slope * max(0, size - run.size) for run in near)
    method = "neighbours"
    if n >= FIT_RUNS:
        slope, intercept = _line(runs)
        line = [max(1.0, intercept + slope * run.size) for run in runs]
        above = max(1.0, max(run.peak / value for run, value in zip(runs, line)))
        # The line where it would have wasted no more than the usual neighbours with the most but
        # one rise (within rounding): it also follows the runs beyond them.
        neighbours = _waste(runs, [usual_rises[min(1, n - 1)] * top for top in usual_tops])
        rounding = 1e-9 * sum(run.peak * max(run.runtime, 1e-3) for run in runs)
        if _waste(runs, [above * value for value in line]) <= neighbours + rounding:
            guess, method = above * max(1.0, intercept + slope * size), "fit"
    return guess, method


def _tops(peaks: Sequence[int], half: int) -> List[int]:
    """Each run's neighbours' highest peak: of the `half` runs on each side (itself left out)."""
    return [max([*peaks[max(0, i - half) : i], *peaks[i + 1 : i + half + 1]], default=p) for i, p in enumerate(peaks)]


def _rises(peaks: Sequence[int], tops: Sequence[int]) -> List[float]:
    """How far each run rose above its neighbours' highest peak (at least 1), the most first."""
    return sorted((max(1.0, peak / max(1, top)) for peak, top in zip(peaks, tops)), reverse=True)


def _line(runs: Sequence[Run]) -> Tuple[float, float]:
    """The least-squares line of peak against size: slope (at least 0: more input never needs
    less) and intercept."""
    n = len(runs)
    mean_size = sum(run.size for run in runs) / n
    mean_peak = sum(run.peak for run in runs) / n
    spread = sum((run.size - mean_size) ** 2 for run in runs)
    slope = 0.0
    if spread:
        slope = max(0.0, sum((run.size - mean_size) * (run.peak - mean_peak) for run in runs) / spread)
    return slope, mean_peak - slope * mean_size


def _cost(runs: Sequence[Run], allocations: Sequence[float], highest: int) -> float:
    """What allocations would have cost the runs under retry_memory (after a miss, at least
    `highest`): the memory left unused times the runtime, and for each miss its allocation
    times its runtime (the attempt lost) plus the run's peak times its runtime (a failure is
    counted, not only its memory)."""
    cost = 0.0
    for run, figure in zip(runs, allocations):
        allocation = math.ceil(figure)  # whole bytes, as reserved (a float a hair under a peak is no miss)
        seconds = max(run.runtime, 1e-3)
        while allocation < run.peak:
            cost += (allocation + run.peak) * seconds
            allocation = retry_memory(allocation, allocation, highest)
        cost += (allocation - run.peak) * seconds
    return cost


def _waste(runs: Sequence[Run], allocations: Sequence[float]) -> float:
    """What allocations would have wasted on the runs, the line's measure against the
    neighbours: the memory left unused times the runtime, and MISS_COST times a missed run's
    allocation times its runtime."""
    cost = 0.0
    for run, figure in zip(runs, allocations):
        allocation = math.ceil(figure)
        seconds = max(run.runtime, 1e-3)
        cost += (allocation - run.peak) * seconds if allocation >= run.peak else MISS_COST * allocation * seconds
    return cost

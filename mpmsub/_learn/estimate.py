"""The estimate `m="auto"` gives a job: its peak memory predicted from past runs of its key (see
docs/auto-memory.md). A pure function of the runs and the job's input size (`estimate`), in two
steps: what the runs say whatever the size (`learn`, a `Model`, which an executor keeps while a
key's runs do not change) and the estimate for one size (`Model.at`). `_learn.keys` says which
runs are of the same key."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from mpmsub._units import MB

WINDOW = 200  # the most recent runs of a key an estimate looks at
MARGIN = 0.10  # where one input size was seen (or this one before): its highest peak plus 10%...
FLOOR = 16 * MB  # ...and every estimate plus 16M (what a process's start may add, for small tools)
NEIGHBOURS = 12  # a run's neighbours by input size: this many, or NEIGHBOURS_SHARE of the runs...
NEIGHBOURS_SHARE = 0.15
CLOSE = 3  # ...or only the nearest CLOSE on each side (a band of sizes whose peaks differ)...
CLOSE_GAIN = 1.25  # ...where that would have cost the past runs this much less
RISES = 8  # the rises weighed: the most a past run rose above its neighbours, and the next 7
FEW_RUNS = 20  # under this many runs, the default rise is the most any run rose (else the most but one)
FIT_RUNS = 30  # the least runs a straight line is weighed against the neighbours from
MISS_COST = 2.0  # the cost of a run the line would have missed, in its allocation x runtime
RETRY_GROWTH = 1.25  # an m="auto" run stopped for memory runs again with its peak times this, or
# with what its key's runs of the nearest sizes reached rising as far as any run did, where that
# is more, at most the highest peak of the window (Estimate.after_miss).
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
    least (0 where that is not above the estimate): the highest peak of the runs of the nearest
    input sizes, following their trend to this size (either way), times the most any past run
    rose above its neighbours', at most the highest peak of the last WINDOW runs. A key whose
    runs now and then need far more than most sends such a run there at once, not in steps; a
    tool whose memory follows its input is sent nowhere near its largest inputs' peaks."""

    memory: int
    method: str
    runs: int
    after_miss: int = 0


@dataclass(frozen=True, eq=False)
class Model:
    """What a key's past runs say whatever the next job's input size (made by `learn`): its
    estimate for one size is then a few steps (`at`)."""

    window: Tuple[Run, ...]  # the last WINDOW runs, by input size
    sizes: Tuple[int, ...]  # their input sizes, in that order
    same: Mapping[int, int]  # the highest peak of each input size, among all the runs (read-only)
    highest: int  # the highest peak of the window
    usual: int  # the usual neighbours: this many on each side
    half: int  # the neighbours chosen: this many on each side...
    rise: float  # ...and how far above their highest peak the estimate goes
    cover: float  # the most any run rose above its usual neighbours (after a miss)
    line: Optional[Tuple[float, float, float]]  # the line where it is chosen: slope, intercept, above

    def at(self, size: int) -> Estimate:
        """The estimate for a run with `size` bytes of input."""
        window, highest = self.window, self.highest
        reach = 0.0
        if self.sizes[0] == self.sizes[-1]:
            seen = self.sizes[0]
            if size > seen > 0:
                base, method = highest * size / seen * (1 + MARGIN), "scaled"
            else:
                base, method = highest * (1 + MARGIN), "highest"
        else:
            i = bisect.bisect_left(self.sizes, size)
            usual = window[max(0, i - self.usual) : i + self.usual] or window
            if self.line is not None:
                slope, intercept, above = self.line
                base, method = above * max(1.0, intercept + slope * size), "fit"
            else:
                near = window[max(0, i - self.half) : i + self.half] or window
                base, method = self.rise * _reached(near, size, _trend(near, usual, window)), "neighbours"
            reach = self.cover * _reached(usual, size, _trend(usual, window), down=True)
        memory = math.ceil(max(base, self.same.get(size, 0) * (1 + MARGIN))) + FLOOR
        after = min(highest, math.ceil(reach))
        return Estimate(memory, method, len(window), after if after > memory else 0)


def estimate(runs: Sequence[Run], size: int, by_cost: bool = True) -> Optional[Estimate]:
    """The memory to reserve for a run with `size` bytes of input, from past `runs` of its key
    (oldest first); None without any. Never below the largest peak of a run with the same input
    size (among all of `runs`, plus the margin), nor below the highest of the last runs where
    sizes do not vary. `by_cost`: see `learn`."""
    model = learn(runs, by_cost)
    return None if model is None else model.at(size)


def learn(runs: Sequence[Run], by_cost: bool = True) -> Optional[Model]:
    """What past `runs` of a key (oldest first) say, whatever the next input's size; None
    without any. `by_cost=False` keeps the default neighbours and rise (for a figure whose miss
    does not run again as retry_memory says: a GPU's memory)."""
    if not runs:
        return None
    window = tuple(sorted(runs[-WINDOW:], key=lambda run: run.size))
    same: Dict[int, int] = {}
    for run in runs:
        same[run.size] = max(run.peak, same.get(run.size, 0))
    n = len(window)
    peaks = [run.peak for run in window]
    highest = max(peaks)
    sizes = tuple(run.size for run in window)
    usual = max(NEIGHBOURS, int(NEIGHBOURS_SHARE * n)) // 2
    if sizes[0] == sizes[-1]:  # one input size: its highest peak is all there is
        return Model(window, sizes, MappingProxyType(same), highest, usual, usual, 1.0, 1.0, None)
    tops = _tops(peaks, usual)
    rises = _rises(peaks, tops)
    half, rise = _choose(window, highest, usual, tops, rises, by_cost)
    line = None
    if n >= FIT_RUNS:
        line = _fit(window, _waste(window, [rises[min(1, n - 1)] * top for top in tops]))
    return Model(window, sizes, MappingProxyType(same), highest, usual, half, rise, rises[0], line)


def retry_memory(allocation: int, peak: int, after_miss: int = 0) -> int:
    """The memory of the next run of an m="auto" job stopped for memory: it had `allocation` and
    was stopped at `peak` (at least its allocation where it was stopped on passing it): what it
    reached, grown by RETRY_GROWTH, not a blind doubling; or its estimate's `after_miss`, where
    that is more."""
    base = max(allocation, peak)
    return max(base + MB, math.ceil(base * RETRY_GROWTH), after_miss)


def _choose(
    runs: Sequence[Run], highest: int, usual: int, tops: List[int], rises: List[float], by_cost: bool
) -> Tuple[int, float]:
    """The neighbours (this many on each side) and the rise above their highest peak: the usual
    neighbours with the most but one rise (the most, from few runs) by default; the closest
    neighbours, or another of the largest rises, where it would have cost the runs CLOSE_GAIN
    times less (a miss running again as retry_memory says): they are judged on the runs they
    are chosen from."""
    n = len(runs)
    default = rises[0 if n < FEW_RUNS else min(1, n - 1)]
    if not by_cost:
        return usual, default
    peaks = [run.peak for run in runs]
    targets = [min(highest, rises[0] * top) for top in tops]  # about where each run's miss would have gone
    best = (_cost(runs, [default * top for top in tops], targets), usual, default)
    for half in (CLOSE, usual) if n > 2 * CLOSE else (usual,):
        near = tops if half == usual else _tops(peaks, half)
        for rise in sorted(set(_rises(peaks, near)[:RISES])):
            cost = CLOSE_GAIN * _cost(runs, [rise * top for top in near], targets)
            if cost < best[0]:
                best = (cost, half, rise)
    return best[1], best[2]


def _fit(runs: Sequence[Run], neighbours: float) -> Optional[Tuple[float, float, float]]:
    """The least-squares line of peak against size, raised by the most any run lies above it
    (slope, intercept, that factor), where it would have wasted no more than the `neighbours`
    (within rounding): it also follows the runs beyond them."""
    slope, intercept = _line(runs)
    line = [max(1.0, intercept + slope * run.size) for run in runs]
    above = max(1.0, max(run.peak / value for run, value in zip(runs, line)))
    rounding = 1e-9 * sum(run.peak * max(run.runtime, 1e-3) for run in runs)
    if _waste(runs, [above * value for value in line]) <= neighbours + rounding:
        return slope, intercept, above
    return None


def _trend(*groups: Sequence[Run]) -> float:
    """The slope of the least-squares line of the first group of runs with two input sizes or
    more (the nearest runs may all have one)."""
    for runs in groups:
        if runs[0].size != runs[-1].size:
            return _line(runs)[0]
    return 0.0


def _reached(near: Sequence[Run], size: int, trend: float, down: bool = False) -> float:
    """The highest peak of `near` runs, each following the `trend` (a slope) upwards to `size`
    where it is larger than theirs (and, `down`, downwards where it is smaller)."""
    return max(run.peak + trend * (size - run.size if down else max(0, size - run.size)) for run in near)


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


def _cost(runs: Sequence[Run], allocations: Sequence[float], targets: Sequence[float]) -> float:
    """What allocations would have cost the runs under retry_memory (after a miss, at least the
    run's target): the memory left unused times the runtime, and for each miss its allocation
    times its runtime (the attempt lost) plus the run's peak times its runtime (a failure is
    counted, not only its memory)."""
    cost = 0.0
    for run, figure, target in zip(runs, allocations, targets):
        allocation = math.ceil(figure)  # whole bytes, as reserved (a float a hair under a peak is no miss)
        seconds = max(run.runtime, 1e-3)
        while allocation < run.peak:
            cost += (allocation + run.peak) * seconds
            allocation = retry_memory(allocation, allocation, math.ceil(target))
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

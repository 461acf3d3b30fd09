"""The estimate `m="auto"` gives a job: its peak memory predicted from past runs of its key (see
docs/auto-memory.md). A pure function of the runs and the job's input size; `_learn.keys` says
which runs are of the same key."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from mpmsub._units import MB

WINDOW = 50  # the most recent runs of a key an estimate looks at
MARGIN = 0.10  # the safety margin: the estimate is the model's figure plus 10%...
FLOOR = 16 * MB  # ...plus 16M (what a process's start may add, for small tools)
# Outcomes whose peak says what the job needed (a memory stop: at least that much). A run that
# was timed out, cancelled, killed by a signal or stopped for its neighbours' sake says little.
LEARNED_FROM = (None, "exit", "memory")


@dataclass(frozen=True)
class Run:
    """A past run of a key: the size of its input files and its peak memory, in bytes."""

    size: int
    peak: int


@dataclass(frozen=True)
class Estimate:
    """A predicted peak in bytes (margin included), the method that gave it, and the number of
    past runs it was made from.

    Methods: "fit" (a straight line of peak against input size, raised to cover every run it
    was fitted to), "scaled" (one input size seen, and this one larger: that run's peak scaled
    by the ratio of sizes), "highest" (the highest peak seen, where sizes do not vary)."""

    memory: int
    method: str
    runs: int


def estimate(runs: Sequence[Run], size: int) -> Optional[Estimate]:
    """The memory to reserve for a run with `size` bytes of input, from past `runs` of its key
    (oldest first); None without any. Never below the largest peak of a run with the same input
    size (among all of `runs`), nor below the highest of the last runs where sizes do not vary."""
    if not runs:
        return None
    window = runs[-WINDOW:]
    sizes = {run.size for run in window}
    highest = max(run.peak for run in window)
    if len(sizes) >= 2:
        base, method = _fit(window, size), "fit"
    elif size > next(iter(sizes)) > 0:
        base, method = highest * size / next(iter(sizes)), "scaled"
    else:
        base, method = float(highest), "highest"
    same = max((run.peak for run in runs if run.size == size), default=0)
    base = max(base, float(same))
    return Estimate(math.ceil(base * (1 + MARGIN)) + FLOOR, method, len(window))


def _fit(runs: Sequence[Run], size: int) -> float:
    """A least-squares line of peak against size (its slope at least 0: more input never
    needs less), raised by the largest amount a run lies above it; its value at `size`."""
    n = len(runs)
    mean_size = sum(run.size for run in runs) / n
    mean_peak = sum(run.peak for run in runs) / n
    spread = sum((run.size - mean_size) ** 2 for run in runs)
    slope = max(0.0, sum((run.size - mean_size) * (run.peak - mean_peak) for run in runs) / spread)
    intercept = mean_peak - slope * mean_size
    above = max(run.peak - (intercept + slope * run.size) for run in runs)
    return max(0.0, intercept + slope * size + max(0.0, above))

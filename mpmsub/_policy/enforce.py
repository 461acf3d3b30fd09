"""Memory enforcement policy: which running jobs to stop, given what each one uses now.

Pure logic, no threads or I/O: the monitor measures, this decides, the loop kills.

- Budget: a job may use more than it declared while there is room, but when the running jobs
  together use more than the executor's budget, the job furthest over its declaration (a job
  without `m` counts as declaring 0) is stopped, then the next, until the rest fit.
- Strict: a job in strict mode is stopped as soon as it uses more than its own `m`.
- Machine: when the machine's available memory falls under the reserve, the newest job is
  stopped and requeued (see `newest`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from mpmsub._units import MB


def _mb(size: int) -> str:
    # Whole megabytes: rounded units would hide an overshoot of a few MB ("1G of the 1G budget").
    return f"{size / MB:.0f}M"


@dataclass(frozen=True)
class Usage:
    """One running job as the policy sees it."""

    key: int  # the job's submission sequence number
    rss: int  # bytes its process tree holds now
    declared: int  # bytes it reserved (0 without `m`)
    strict: bool
    started: float  # monotonic start time
    held: int = 0  # bytes of its output this process holds for it (captured stdout and stderr)

    @property
    def total(self) -> int:
        """What it costs the machine: its processes and the output held for it."""
        return self.rss + self.held


@dataclass(frozen=True)
class Stop:
    key: int
    message: str


def strict_stops(usages: Sequence[Usage]) -> List[Stop]:
    """Jobs in strict mode that use more than they declared."""
    return [Stop(u.key, strict_overuse(u.rss, u.declared)) for u in usages if u.strict and u.rss > u.declared]


def strict_overuse(used: int, declared: int, ended: bool = False) -> str:
    """Why a strict job failed: it used more than its `m` (seen while it ran, or, `ended`, only in
    its final peak: its whole life was between two samples, or this process was not running)."""
    when = "; measured at its end" if ended else ""
    return f"exceeded its memory limit: used {_mb(used)} of the {_mb(declared)} it declared (strict memory{when})"


def gpu_overuse(used: int, reserved: int) -> str:
    """Why a job with gpu(..., strict=True) was stopped: its processes held more GPU memory than
    it reserved on its devices."""
    return (
        f"exceeded its GPU memory: its processes used {_mb(used)} of GPU memory, over the {_mb(reserved)} it "
        "reserved (gpu strict)"
    )


def budget_stops(usages: Sequence[Usage], budget: int) -> List[Stop]:
    """The jobs to stop so that the rest fit in `budget`: furthest over its declaration first."""
    total = sum(u.total for u in usages)
    if total <= budget:
        return []
    stops: List[Stop] = []
    # Furthest over its declaration first; among equals, the newest (it has lost the least work).
    candidates = sorted(usages, key=lambda u: (u.total - u.declared, u.started), reverse=True)
    for u in candidates:
        if total <= budget:
            break
        declared = _mb(u.declared) if u.declared else "no memory"
        output = f" ({_mb(u.held)} of it its captured output, held by mpmsub)" if u.held else ""
        stops.append(
            Stop(
                u.key,
                f"exceeded memory: used {_mb(u.total)}{output} having declared {declared}, while "
                f"the running jobs together used {_mb(total)} of the "
                f"{_mb(budget)} budget",
            )
        )
        total -= u.total
    return stops


def newest(usages: Sequence[Usage]) -> Optional[Usage]:
    """The job to stop and requeue when the machine runs short: the most recently started."""
    return max(usages, key=lambda u: u.started, default=None)

"""The launcher seam: how a job is started, learnt to have ended, killed and measured.

The executor (ledger, scheduler, futures) talks to a Launcher only through this interface, so a
pool of reused Python workers, a Dask worker or a SLURM job can replace local processes without
touching the rest. Contract:

- `Launcher.start(spec, job_id, on_exit)` starts the job without blocking for long and returns a
  Handle. `on_exit(outcome)` is called exactly once, from any thread, when the job is over
  (including when it could not be started at all).
- `Handle.kill(failure, message, grace)` is called on the executor's loop thread; it returns
  whether it started the kill, and the job still ends through `on_exit`, whose outcome carries
  the failure of the kill that started first.
- `Handle.sample(snapshot)` is called from the monitor thread with a process snapshot of this
  machine; it returns the job's current resident bytes, or None where the job's processes are
  not on this machine. `Handle.roots()` names the job's first processes on this machine, so
  that the monitor reads them from the first sample on.
"""

from __future__ import annotations

import abc
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, List, NamedTuple, Optional, Sequence, Tuple

from mpmsub._launch.proctree import Snapshot
from mpmsub._spec import JobSpec

if TYPE_CHECKING:
    from mpmsub._result import FailureKind


@dataclass
class Outcome:
    """What a launcher measured of one job."""

    returncodes: List[Optional[int]]  # one per pipeline stage; None for a stage that never ran
    stdout: Optional[str]
    stderr: Optional[str]
    start_time: float  # Unix time
    runtime: float  # seconds, from a monotonic clock
    cpu_time: float  # seconds of user + system time
    peak_memory: int  # bytes, whole process tree
    failure: Optional[FailureKind] = None  # when the launcher knows it
    error: Optional[str] = None  # the sentence that goes with `failure`
    memory_series: List[Tuple[float, int]] = field(default_factory=list)  # (seconds in, bytes)
    oom_kills: Optional[int] = None  # the job's processes killed by the kernel's OOM killer, if known
    # The peak of the job's processes themselves (rusage, samples), without its cgroup's figure,
    # which also counts page cache; None where the launcher does not say (a remote backend).
    process_peak: Optional[int] = None
    value: Any = None  # what a Python call returned
    exception: Optional[BaseException] = None  # what a Python call raised (failure "raised")
    host: Optional[str] = None  # where it ran (JobResult.host); None if it never started
    gpus: Optional[Tuple[int, ...]] = None  # the GPU devices it had, where the launcher chose them
    gpu_peak: Optional[int] = None  # bytes: the peak GPU memory of its processes, where measured


def not_started(spec: JobSpec, failure: FailureKind, error: str) -> Outcome:
    """The Outcome of a job that ended before it could start: nothing ran, nothing measured."""
    return Outcome([None] * len(spec.stages), None, None, time.time(), 0.0, 0.0, 0, failure, error)


class MemorySeries:
    """A job's sampled memory over time, in at most `limit` points: (seconds since its start,
    bytes). When full, neighbouring points merge in pairs (keeping the larger, so no peak is
    lost) and later samples closer than the new spacing merge into the last point."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self.points: List[Tuple[float, int]] = []
        self._spacing = 0.0

    def add(self, seconds: float, value: int) -> None:
        points = self.points
        if points and seconds - points[-1][0] < self._spacing:
            if value > points[-1][1]:
                points[-1] = (points[-1][0], value)
            return
        points.append((seconds, value))
        if len(points) >= self.limit:
            merged = [(a[0], max(a[1], b[1])) for a, b in zip(points[::2], points[1::2])]
            if len(points) % 2:
                merged.append(points[-1])
            self.points = merged
            self._spacing = (merged[-1][0] - merged[0][0]) / max(1, len(merged) - 1)


class Handle(abc.ABC):
    """One started job."""

    # True once the launcher measures the job's whole-tree peak by other means than sampling
    # (a memory cgroup), so that sampling need not be fast to catch it.
    exact_peak = False
    # The pids of its process tree at the last sample (where it runs here): whose GPU memory is its.
    tree: Collection[int] = ()

    @abc.abstractmethod
    def kill(self, failure: FailureKind, message: str, grace: Optional[float] = None) -> bool:
        """Stop the job's whole process tree; `grace` seconds between SIGTERM and SIGKILL.

        True if this call started the kill (and so decides the failure); False if the job had
        ended or was being killed already. A kill with no grace during another's grace hastens it.
        """

    def sample(self, snapshot: Snapshot) -> Optional[int]:
        """Current resident bytes of the job's processes on this machine, or None if not here."""
        return None

    def roots(self) -> Sequence[int]:
        """Pids of the job's first processes on this machine (none where it runs elsewhere)."""
        return ()

    def cpu_time(self, snapshot: Snapshot) -> Optional[float]:
        """The CPU time the job used so far, in seconds (for `running()`, on the caller's
        thread); None where it runs elsewhere."""
        return None


def escalate(killing: bool, grace: float, send: Callable[[int], None], later: Callable[[float, int], None]) -> bool:
    """The kill every handle does: SIGTERM, then SIGKILL `grace` seconds later (`later` schedules
    it), or SIGKILL at once without grace. If a kill is under way (`killing`), a kill without
    grace hastens it. True if this call started the kill (its failure then decides the end)."""
    if grace <= 0:
        send(signal.SIGKILL)
    elif not killing:
        send(signal.SIGTERM)
        later(grace, signal.SIGKILL)
    return not killing


class PoolOptions(NamedTuple):
    """ProcessPoolExecutor's options for the workers, as the executor was given them, and
    whether workers may be forked from a zygote (not where a "spawn" context was asked for)."""

    max_tasks_per_child: Optional[int] = None
    initializer: Optional[Callable[..., Any]] = None
    initargs: Tuple[Any, ...] = ()
    zygote: bool = True


class Launcher(abc.ABC):
    """Places jobs somewhere and reports when they end."""

    # False where jobs run on other machines: this machine's memory gate, OOM counts and
    # sampling do not apply to them (their own launcher there does all of that).
    local = True
    # True where a job handed over waits there before it begins (a Dask task waiting for a
    # worker): its future stays pending, and cancel() takes it back, until the launcher calls
    # `on_begin(job_id)` (any thread; set by the engine) when it begins.
    defers_start = False
    # True where start() only takes the job, and flush() hands over those of a round at once
    # (on the loop, after the callbacks queued when the first was started).
    groups_starts = False
    on_begin: Callable[[str], None] = staticmethod(lambda job_id: None)

    def why_never_fits(self, spec: JobSpec) -> Optional[str]:
        """Why no place this launcher uses can ever hold the job (checked at submit), or None."""
        return None

    @abc.abstractmethod
    def start(self, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None]) -> Handle:
        """Start `spec`; call `on_exit` once when it is over."""

    def flush(self) -> None:  # noqa: B027 - optional hook, nothing held back by default
        """Hand over what start() took since the last call (see groups_starts)."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the launcher holds; called once no job is running."""

    def where(self, handles: Sequence[Handle]) -> List[str]:
        """Where each of these running jobs runs, in words (for `running()`, on the caller's
        thread): this machine's name by default."""
        from mpmsub._system import hostname

        return [hostname()] * len(handles)

    def housekeeping(self) -> None:  # noqa: B027 - optional hook
        """Work that must not run on the event loop: called on the monitor thread at each tick,
        and once more when no job is left to watch."""

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
  not on this machine.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from mpmsub._job import JobSpec
from mpmsub._proctree import Snapshot


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
    failure: Optional[str] = None  # a kind from mpmsub._result, when the launcher knows it
    error: Optional[str] = None  # the sentence that goes with `failure`
    memory_series: List[float] = field(default_factory=list)


class Handle(abc.ABC):
    """One started job."""

    @abc.abstractmethod
    def kill(self, failure: str, message: str, grace: Optional[float] = None) -> bool:
        """Stop the job's whole process tree; `grace` seconds between SIGTERM and SIGKILL.

        True if this call started the kill (and so decides the failure); False if the job had
        ended or was being killed already. A kill with no grace during another's grace hastens it.
        """

    def sample(self, snapshot: Snapshot) -> Optional[int]:
        """Current resident bytes of the job's processes on this machine, or None if not here."""
        return None


class Launcher(abc.ABC):
    """Places jobs somewhere and reports when they end."""

    @abc.abstractmethod
    def start(self, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None]) -> Handle:
        """Start `spec`; call `on_exit` once when it is over."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the launcher holds; called once no job is running."""

"""JobResult: what a finished (or failed, or stopped) job did."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Tuple, Union

from mpmsub._errors import JobFailedError
from mpmsub._units import MB

if TYPE_CHECKING:
    from mpmsub._spec import JobSpec

# Kinds of failure, recorded on JobResult.failure (None for a success). FailureKind names them
# all; each constant is typed as its own value, so that a type checker accepts it as one.
FailureKind = Literal[
    "exit", "signal", "timeout", "memory", "start", "cancelled", "killed", "error", "raised", "pickle"
]
EXIT: Literal["exit"] = "exit"  # ran and exited non-zero
SIGNAL: Literal["signal"] = "signal"  # killed by a signal it was not sent by mpmsub
TIMEOUT: Literal["timeout"] = "timeout"
MEMORY: Literal["memory"] = "memory"  # stopped by mpmsub for memory, or killed by the kernel's out-of-memory killer
START: Literal["start"] = "start"  # could not be started: program or working directory not found, not executable, ...
CANCELLED: Literal["cancelled"] = "cancelled"  # stopped by shutdown, Ctrl-C or cancellation while running
KILLED: Literal["killed"] = "killed"  # stopped on its own by kill() (JobFuture.kill, executor.kill, Cluster.kill)
ERROR: Literal["error"] = "error"  # mpmsub itself failed while running the job
RAISED: Literal["raised"] = "raised"  # a Python call raised an exception
PICKLE: Literal["pickle"] = "pickle"  # a Python call, or what it returned, could not be pickled or unpickled


@dataclass(frozen=True)
class JobResult:
    """The outcome of one job. A non-zero exit is data here, as with `subprocess.run`.

    Times are seconds (`start_time`/`end_time` are Unix timestamps); `memory_used` is the peak of
    the whole process tree in MB; `cpu_used` is CPU time (user + system) of every process of the
    job that was waited for, in seconds; `memory_series` is the tree's sampled resident memory
    over the run, as (seconds since start, MB) pairs, at most 256 of them.

    For a Python call (`submit(fn, ...)`, `Call`, `map`), `cmd` is a one-item list describing
    the call, `returncode` is None, `value` is what it returned and `exception` what it raised
    (`failure` "raised"); `memory_used` is the peak of its worker process during that call alone.
    """

    job_id: str
    cmd: Union[List[str], List[List[str]]]
    returncode: Optional[int]
    stdout: Optional[str]
    stderr: Optional[str]
    runtime: float
    memory_used: float
    cpu_used: float
    start_time: float
    end_time: float
    error: Optional[str] = None
    failure: Optional[FailureKind] = None
    cpus: int = 1
    memory_requested: Optional[float] = None
    stage_returncodes: List[Optional[int]] = field(default_factory=list)
    attempts: int = 1
    requeued: int = 0  # times it was stopped and put back because the machine ran short of memory
    memory_series: List[Tuple[float, float]] = field(default_factory=list)
    # A Python call's return value, or the exception it raised (None for commands).
    value: Any = field(default=None, repr=False, compare=False)
    exception: Optional[BaseException] = field(default=None, repr=False, compare=False)
    # m="auto": how its memory was predicted ("neighbours", "fit", "scaled", "highest"; "probe" for the run
    # that measured a tool never seen) and from how many past runs (None, 0: not predicted).
    memory_estimate: Optional[str] = None
    memory_estimate_runs: int = 0
    # Where it ran: this machine's name for a local job, the node's under SLURM, the worker's
    # address under Dask; None for a job that never started.
    host: Optional[str] = None
    # What it held beside CPUs and memory: its GPU devices by id (as its CUDA_VISIBLE_DEVICES
    # named them), the GPU memory it reserved on each and its processes' peak on them in MB (None:
    # not asked, or not measured: NVML is needed), and the named resources of the executor's
    # `resources=` it held.
    gpus: Tuple[int, ...] = ()
    gpu_memory_requested: Optional[float] = None
    gpu_memory_used: Optional[float] = None
    resources: Dict[str, int] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """True when the job ran and every process of it exited 0."""
        return self.failure is None

    @property
    def id(self) -> str:
        """Alias of job_id."""
        return self.job_id

    @property
    def timed_out(self) -> bool:
        return self.failure == TIMEOUT

    def check_returncode(self) -> None:
        """Raise JobFailedError if the job did not succeed (as CompletedProcess.check_returncode)."""
        if not self.success:
            raise JobFailedError(self)


def never_ran(spec: JobSpec, job_id: str, failure: FailureKind, error: str, **fields: Any) -> JobResult:
    """The result of a job or call that ended before it ran (cancelled, could not be sent)."""
    now = time.time()
    return JobResult(
        job_id=job_id,
        cmd=spec.cmd,
        returncode=None,
        stdout=None,
        stderr=None,
        runtime=0.0,
        memory_used=0.0,
        cpu_used=0.0,
        start_time=now,
        end_time=now,
        error=error,
        failure=failure,
        cpus=spec.cpus,
        memory_requested=None if spec.memory is None else spec.memory / MB,
        **fields,
    )

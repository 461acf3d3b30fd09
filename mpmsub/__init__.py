"""mpmsub: run many commands in parallel on one machine without running it out of memory."""

from __future__ import annotations

from mpmsub._call import Call
from mpmsub._cluster import Cluster, JobList, cluster
from mpmsub._dask import DaskBackend
from mpmsub._errors import (
    CallCancelledError,
    CallError,
    CallPicklingError,
    CallTimeoutError,
    JobFailedError,
    MemoryLimitError,
    MpmsubError,
    RemoteTraceback,
    WorkerDiedError,
)
from mpmsub._executor import ExecutorStatus, MemoryAwareExecutor
from mpmsub._future import JobFuture
from mpmsub._htmlreport import write_report
from mpmsub._job import Job, Pipeline, job, pipeline
from mpmsub._report import recommend_memory
from mpmsub._result import JobResult
from mpmsub._slurm import SlurmBackend
from mpmsub._units import format_memory, parse_memory

__version__ = "0.1.0"

__all__ = [
    "Call",
    "CallCancelledError",
    "CallError",
    "CallPicklingError",
    "CallTimeoutError",
    "Cluster",
    "DaskBackend",
    "ExecutorStatus",
    "Job",
    "JobFailedError",
    "JobFuture",
    "JobList",
    "JobResult",
    "MemoryAwareExecutor",
    "MemoryLimitError",
    "MpmsubError",
    "Pipeline",
    "RemoteTraceback",
    "SlurmBackend",
    "WorkerDiedError",
    "__version__",
    "cluster",
    "format_memory",
    "job",
    "parse_memory",
    "pipeline",
    "recommend_memory",
    "write_report",
]

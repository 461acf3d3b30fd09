"""mpmsub: run many commands in parallel on one machine without running it out of memory."""

from __future__ import annotations

from mpmsub._cluster import Cluster, JobList, cluster
from mpmsub._errors import JobFailedError, MpmsubError
from mpmsub._executor import ExecutorStatus, MemoryAwareExecutor
from mpmsub._job import Job, Pipeline, job, pipeline
from mpmsub._report import recommend_memory
from mpmsub._result import JobResult
from mpmsub._units import format_memory, parse_memory

__version__ = "0.1.0"

__all__ = [
    "Cluster",
    "ExecutorStatus",
    "Job",
    "JobFailedError",
    "JobList",
    "JobResult",
    "MemoryAwareExecutor",
    "MpmsubError",
    "Pipeline",
    "__version__",
    "cluster",
    "format_memory",
    "job",
    "parse_memory",
    "pipeline",
    "recommend_memory",
]

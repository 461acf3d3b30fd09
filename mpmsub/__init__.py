"""mpmsub: run many commands in parallel on one machine without running it out of memory.

Every job declares (or learns) its CPUs and memory; a ledger starts only what fits, the whole
process tree of each job is measured, and a job that uses more than it said is stopped before
it hurts the others.

- `MemoryAwareExecutor`: a `concurrent.futures.Executor`; `submit(Job | dict | argv)` for a
  command, `submit(fn, *args)` / `map(fn, ...)` for Python functions. Futures resolve to a
  `JobResult` (a command's) or the function's value, with the measured usage in `future.usage`.
- `cluster(p=, m=)` / `Cluster`: the original mpmsub's batch API (`.jobs.append`, `.run()`,
  `.profile()`, `.print_summary()`, `.report()`).
- `Job`, `Pipeline`, `Call`: a job's command and resources (`.cpu()`, `.memory("4G")`,
  `.memory("auto")` to learn it from past runs, `.with_timeout()`, ...).
- `DaskBackend`, `SlurmBackend`: the same jobs on a Dask cluster or under SLURM (`backend=`).
- The `mpmsub` command: `mpmsub run jobs.txt -p 8 -m 32G`; see `mpmsub run -h`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mpmsub._call import Call
from mpmsub._cluster import Cluster, JobList, cluster
from mpmsub._errors import (
    CallCancelledError,
    CallError,
    CallPicklingError,
    CallTimeoutError,
    JobFailedError,
    MemoryLimitError,
    MpmsubError,
    RemoteTraceback,
)
from mpmsub._executor import ExecutorStatus, MemoryAwareExecutor
from mpmsub._future import JobFuture
from mpmsub._job import Job, Pipeline, job, pipeline
from mpmsub._result import JobResult
from mpmsub._units import parse_memory
from mpmsub.utils import format_memory, parse_cpu_string, parse_memory_string  # the original's, in MB

if TYPE_CHECKING:
    from mpmsub._dask import DaskBackend
    from mpmsub._errors import WorkerDiedError
    from mpmsub._htmlreport import write_report
    from mpmsub._report import recommend_memory
    from mpmsub._slurm import SlurmBackend

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
    "parse_cpu_string",
    "parse_memory",
    "parse_memory_string",
    "pipeline",
    "recommend_memory",
    "write_report",
]

# Names whose modules (and their imports: asyncio, sqlite3, multiprocessing, ...) most programs
# never need: imported on first use, so that `import mpmsub` stays quick (every worker and every
# `mpmsub` command line pays for it). Type checkers see them imported above.
_LAZY = {
    "DaskBackend": "mpmsub._dask",
    "SlurmBackend": "mpmsub._slurm",
    "WorkerDiedError": "mpmsub._errors",
    "recommend_memory": "mpmsub._report",
    "write_report": "mpmsub._htmlreport",
}

if not TYPE_CHECKING:  # a type checker would take every misspelt name for a lazy one

    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # found directly from now on
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

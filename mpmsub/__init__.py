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

TYPE_CHECKING = False  # typing's own, without importing typing (type checkers know the name)
if TYPE_CHECKING:
    from mpmsub import utils as utils
    from mpmsub._backends.dask import DaskBackend
    from mpmsub._backends.slurm import SlurmBackend
    from mpmsub._call import Call
    from mpmsub._cluster import Cluster, JobList, cluster
    from mpmsub._engine.executor import ExecutorStatus, MemoryAwareExecutor, RunningJob
    from mpmsub._engine.future import JobFuture
    from mpmsub._errors import (
        CallCancelledError,
        CallError,
        CallKilledError,
        CallPicklingError,
        CallTimeoutError,
        JobFailedError,
        MemoryLimitError,
        MpmsubError,
        RemoteTraceback,
        WorkerDiedError,
    )
    from mpmsub._job import Job, Pipeline, job, pipeline
    from mpmsub._report.html import write_report
    from mpmsub._report.text import recommend_memory
    from mpmsub._result import FailureKind, JobResult
    from mpmsub._units import parse_memory
    from mpmsub._version import __version__
    from mpmsub.utils import format_memory, parse_cpu_string, parse_memory_string  # the original's, in MB


__all__ = [
    "Call",
    "CallCancelledError",
    "CallError",
    "CallKilledError",
    "CallPicklingError",
    "CallTimeoutError",
    "Cluster",
    "DaskBackend",
    "ExecutorStatus",
    "FailureKind",
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
    "RunningJob",
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

# Every public name is imported on first use, from the module that defines it: `import mpmsub`
# itself imports nothing, which every worker (it imports the program's main module, and with it
# mpmsub) and every `mpmsub` command line would pay for; the engine is imported when a program
# first names it. Type checkers see the names imported above.
_LAZY = {
    "__version__": "mpmsub._version",
    "Call": "mpmsub._call",
    "Cluster": "mpmsub._cluster",
    "JobList": "mpmsub._cluster",
    "cluster": "mpmsub._cluster",
    "DaskBackend": "mpmsub._backends.dask",
    "ExecutorStatus": "mpmsub._engine.executor",
    "RunningJob": "mpmsub._engine.executor",
    "MemoryAwareExecutor": "mpmsub._engine.executor",
    "JobFuture": "mpmsub._engine.future",
    "write_report": "mpmsub._report.html",
    "Job": "mpmsub._job",
    "Pipeline": "mpmsub._job",
    "job": "mpmsub._job",
    "pipeline": "mpmsub._job",
    "recommend_memory": "mpmsub._report.text",
    "FailureKind": "mpmsub._result",
    "JobResult": "mpmsub._result",
    "SlurmBackend": "mpmsub._backends.slurm",
    "parse_memory": "mpmsub._units",
    "format_memory": "mpmsub.utils",
    "parse_cpu_string": "mpmsub.utils",
    "parse_memory_string": "mpmsub.utils",
    **dict.fromkeys(
        [
            "CallCancelledError",
            "CallError",
            "CallKilledError",
            "CallPicklingError",
            "CallTimeoutError",
            "JobFailedError",
            "MemoryLimitError",
            "MpmsubError",
            "RemoteTraceback",
            "WorkerDiedError",
        ],
        "mpmsub._errors",
    ),
}

if not TYPE_CHECKING:  # a type checker would take every misspelt name for a lazy one

    def __getattr__(name: str) -> object:
        import importlib

        if name == "utils":  # the original mpmsub's module, always there
            return importlib.import_module("mpmsub.utils")
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # found directly from now on
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"utils"})

"""The original mpmsub's `mpmsub.utils`, kept so that its scripts run unchanged.

Its units are the original's: memory in whole MB, durations as '1m 5s'. Parsing and checking go
through mpmsub's own parsers, so bad input raises a ValueError or TypeError that names it. New
code needs none of this: `mpmsub.parse_memory` (bytes) and `mpmsub.Job` do the same.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Mapping, Optional, Union

from mpmsub._job import SEED_OPTIONS, Pipeline, job_from_dict, optional_fields
from mpmsub._spec import JobSpec
from mpmsub._system import available_memory, detect_cpus, memory_groups
from mpmsub._units import MB, MemoryLike, parse_cpus, parse_memory, shown

__all__ = [
    "format_duration",
    "format_memory",
    "get_system_resources",
    "parse_cpu_string",
    "parse_memory_string",
    "validate_job",
]


def parse_memory_string(memory: Optional[MemoryLike]) -> Optional[int]:
    """Memory as whole MB (rounded down): '16G' -> 16384, '2048M' and 2048 -> 2048; None stays None."""
    if memory is None:
        return None
    return parse_memory(memory, "memory") // MB


def parse_cpu_string(cpus: Union[int, str, None]) -> Optional[int]:
    """A number of CPUs from an int or a digit string ('4' -> 4); None stays None."""
    if cpus is None:
        return None
    return parse_cpus(cpus, "cpus")


def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number; got {shown(value)} ({type(value).__name__})")
    if not 0 <= value <= sys.float_info.max:  # negative, nan or inf; an int too large for a float too
        raise ValueError(f"invalid {what} {shown(value)}: expected a finite number, 0 or more")
    return float(value)


def format_memory(mb: float) -> str:
    """A size in MB as the original wrote it: '512M' under 1024 MB, else GB with one decimal ('1.5G')."""
    size = _finite(mb, "memory in MB")
    return f"{size / 1024:.1f}G" if size >= 1024 else f"{int(size)}M"


def format_duration(seconds: float) -> str:
    """A duration as the original wrote it: '30.0s', '1m 5s', '2h 0m 10s'."""
    value = _finite(seconds, "duration in seconds")
    if value < 60:
        return f"{value:.1f}s"
    whole = int(value)
    hours, minutes, secs = whole // 3600, whole % 3600 // 60, whole % 60
    return f"{hours}h {minutes}m {secs}s" if hours else f"{minutes}m {secs}s"


def get_system_resources() -> Dict[str, int]:
    """CPUs this process may use and the memory available now, in MB: {'cpus': ..., 'memory_mb': ...}."""
    return {"cpus": detect_cpus(), "memory_mb": available_memory(memory_groups()) // MB}


def validate_job(job: Mapping[str, Any]) -> Dict[str, Any]:
    """Check a job dict and return it normalised as the original did: `p` an int (1 by default),
    `m` in MB (None: no reservation), and every one of its keys present (None where unset)."""
    if not isinstance(job, Mapping):
        raise TypeError(f"a job must be a dict with a 'cmd' key; got {shown(job)} ({type(job).__name__})")
    return as_original_dict(job_from_dict(job).spec())


def as_original_dict(spec: JobSpec) -> Dict[str, Any]:
    """A validated job as the original's job dict: cmd (a Pipeline for a pipeline), p, m in MB,
    id, cwd, env, timeout, stdout, stderr; then any of mpmsub's own options that are set."""
    cmd: Any = Pipeline(spec.stages) if spec.is_pipeline else spec.cmd
    memory: Union[int, float, str, None]
    if spec.auto:
        memory = "auto"
    elif spec.memory is None:
        memory = None
    else:  # a whole number of MB as an int, as the original had it
        memory = spec.memory // MB if spec.memory % MB == 0 else spec.memory / MB
    data: Dict[str, Any] = {"cmd": cmd, "p": spec.cpus, "m": memory, "id": spec.job_id}
    data.update(dict.fromkeys(SEED_OPTIONS))
    data.update(optional_fields(spec))
    return data

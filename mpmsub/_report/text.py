"""Plain-text reports on finished jobs: statistics, summary, resources and profiling advice.

Pure functions of results and figures; printing is the caller's choice.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from mpmsub._call import function_name
from mpmsub._job import optional_fields
from mpmsub._policy.runs import PROFILE_BUFFER  # the margin profile() adds to a measured peak
from mpmsub._result import CANCELLED, KILLED, JobResult
from mpmsub._spec import JobSpec, describe_command
from mpmsub._system import cgroup_memory_limit, detect_cpus, machine_memory
from mpmsub._units import MB, format_memory, shorten


def recommend_memory(peak_mb: float, buffer: float = PROFILE_BUFFER) -> str:
    """A memory request for a job that peaked at `peak_mb`: the peak plus `buffer`, rounded up
    to two significant figures ('150M', '2.5G')."""
    if peak_mb < 0 or not math.isfinite(peak_mb):
        raise ValueError(f"invalid peak {peak_mb!r}: expected a number of MB, 0 or more")
    want = max(1.0, peak_mb * (1 + buffer))
    if want >= 1024:
        return f"{math.ceil(want / 1024 * 10) / 10:g}G"
    step = 10 ** max(0, math.floor(math.log10(want)) - 1)
    return f"{math.ceil(want / step) * step:g}M"


def job_stats(
    results: Sequence[JobResult],
    *,
    cpus: int,
    memory: int,
    wall_time: Optional[float],
    max_workers: Optional[int] = None,
    resources: Optional[Mapping[str, int]] = None,
    gpus: int = 0,
) -> Dict[str, Any]:
    """The stats dict of `cluster.run()`: cluster figures (its named `resources` and number of
    `gpus` among them), job counts, time, memory and CPU."""
    ok = [r for r in results if r.success]
    runtimes = [r.runtime for r in results if _ran(r)]
    peaks = [r.memory_used for r in results]
    job_time = sum(runtimes)
    return {
        "cluster": {
            "cpus": cpus,
            "memory_mb": memory / MB,
            "memory": format_memory(memory),
            "max_workers": max_workers,
            "gpus": gpus,
            "resources": dict(sorted((resources or {}).items())),
        },
        "jobs": {
            "total": len(results),
            "completed": len(ok),
            "failed": len(results) - len(ok),
            "cancelled": sum(r.failure == CANCELLED for r in results),
            "killed": sum(r.failure == KILLED for r in results),
            "success_rate": len(ok) / len(results) if results else 0.0,
        },
        "time": {
            "wall": wall_time,
            "job_total": job_time,
            "job_mean": job_time / len(runtimes) if runtimes else 0.0,
            "job_max": max(runtimes, default=0.0),
            "speedup": job_time / wall_time if wall_time else None,
        },
        "memory": {
            "peak_job_mb": max(peaks, default=0.0),
            "mean_job_mb": sum(peaks) / len(peaks) if peaks else 0.0,
            "requested_mb": sum(r.memory_requested or 0.0 for r in results),
        },
        "cpu": {"cpu_seconds": sum(r.cpu_used for r in results)},
    }


def _ran(result: JobResult) -> bool:
    """Whether a job ran at all: one cancelled or killed while it waited has no runtime."""
    return result.failure not in (CANCELLED, KILLED) or result.runtime > 0


_LINE_BREAKS = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def one_line(text: str) -> str:
    """`text` for a line of a table: newlines, carriage returns and tabs written as \\n, \\r, \\t
    (a `python -c` script's lines would break the table)."""
    return text.translate(_LINE_BREAKS)


def from_one_line(text: str) -> str:
    """What `one_line` made, back as it was (for a key copied from a table)."""
    return text.replace("\\n", "\n").replace("\\r", "\r").replace("\\t", "\t")


def command_line(cmd: Any) -> str:
    """A JobResult's `cmd` (an argv list, or a pipeline's list of them) as one line of text."""
    stages = cmd if cmd and isinstance(cmd[0], list) else [cmd]
    return describe_command(stages)


def _command(result: JobResult) -> str:
    return one_line(command_line(result.cmd))


OVER_ASKING = 2.0  # a job reserving more than twice its peak (and 50 MB more) asks too much
_OVER_MB = 50.0


def asks_too_much(requested_mb: float, used_mb: float) -> bool:
    """Whether a job that reserved `requested_mb` and peaked at `used_mb` asked for far more."""
    return requested_mb > OVER_ASKING * used_mb and requested_mb - used_mb > _OVER_MB


def _over_askers(asked: Sequence[JobResult], top: int) -> List[str]:
    """The jobs that reserved the most memory they did not use, with an m from their peak."""
    over = [r for r in asked if r.success and asks_too_much(r.memory_requested or 0.0, r.memory_used)]
    if not over:
        return []
    over.sort(key=lambda r: (r.memory_requested or 0.0) - r.memory_used, reverse=True)
    lines = ["", f"Jobs that asked for far more memory than they used ({len(over)}; m from their peak + 20%):"]
    for r in over[:top]:
        share = 100 * r.memory_used / (r.memory_requested or 1.0)
        lines.append(
            f"  {r.job_id:<14} asked {r.memory_requested:.0f} MB, used {r.memory_used:.1f} MB ({share:.0f}%)  "
            f"m={recommend_memory(r.memory_used)!r:<8} {shorten(_command(r), 40)}"
        )
    if len(over) > top:
        lines.append(f"  ... and {len(over) - top} more")
    return lines


def _failed_apart(jobs: Dict[str, Any]) -> str:
    """The failed jobs that were killed or cancelled, counted apart: ' (1 killed, 2 cancelled)'."""
    apart = [f"{jobs[kind]} {kind}" for kind in ("killed", "cancelled") if jobs.get(kind)]
    return f" ({', '.join(apart)})" if apart else ""


def _job_errors(title: str, results: Sequence[JobResult], most: int) -> List[str]:
    """A block of the summary listing `results` (the first `most`) with their errors."""
    if not results:
        return []
    lines = ["", f"{title} ({len(results)}):"]
    for r in results[:most]:
        error = shorten(one_line(r.error or ""), 50)
        lines.append(f"  {r.job_id:<14} {error:<50} {shorten(_command(r), 40)}")
    if len(results) > most:
        lines.append(f"  ... and {len(results) - most} more")
    return lines


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _resources(cluster: Dict[str, Any]) -> str:
    """What the jobs shared: '8 CPUs, 32G memory, 4 GPUs, licence 2'."""
    parts = [_plural(cluster["cpus"], "CPU"), f"{cluster['memory']} memory"]
    if cluster.get("gpus"):
        parts.append(_plural(cluster["gpus"], "GPU"))
    parts += [f"{name} {count}" for name, count in (cluster.get("resources") or {}).items()]
    return ", ".join(parts)


def _gpu_line(results: Sequence[JobResult]) -> List[str]:
    """How many jobs held GPUs, and the largest GPU memory peak where NVML measured one."""
    held = [r for r in results if r.gpus]
    if not held:
        return []
    devices = sorted({device for r in held for device in r.gpus})
    line = f"  GPUs:      {len(held)} job(s) held GPUs (devices {', '.join(map(str, devices))})"
    measured = [r for r in held if r.gpu_memory_used is not None]
    if measured:
        biggest = max(measured, key=lambda r: r.gpu_memory_used or 0.0)
        line += f", largest GPU memory peak {biggest.gpu_memory_used:.1f} MB ({biggest.job_id})"
    return [line]


def summary_text(stats: Dict[str, Any], results: Sequence[JobResult], top: int = 5) -> str:
    jobs, times, mem = stats["jobs"], stats["time"], stats["memory"]
    cluster = stats["cluster"]
    lines = [
        "mpmsub summary",
        f"  resources: {_resources(cluster)}"
        + (f", at most {cluster['max_workers']} jobs at once" if cluster.get("max_workers") else ""),
        f"  jobs:      {jobs['total']} total, {jobs['completed']} completed, {jobs['failed']} failed"
        + _failed_apart(jobs),
    ]
    if times["wall"] is not None:
        speed = f", {times['speedup']:.1f}x the serial time" if times["speedup"] else ""
        lines.append(f"  time:      {times['wall']:.2f} s wall, {times['job_total']:.2f} s of job time{speed}")
    if results:
        biggest = max(results, key=lambda r: r.memory_used)
        lines.append(
            f"  memory:    largest peak {biggest.memory_used:.1f} MB ({biggest.job_id}), "
            f"mean {mem['mean_job_mb']:.1f} MB"
        )
    lines += _gpu_line(results)
    # A job stopped before its end (cancelled, killed) never reached the peak it would have had.
    reserving = [r for r in results if r.memory_requested and r.failure not in (CANCELLED, KILLED)]
    if reserving:
        used = sum(r.memory_used for r in reserving)
        requested = sum(r.memory_requested or 0.0 for r in reserving)
        lines.append(
            f"  efficiency: the {len(reserving)} job(s) with m used {100 * used / requested:.0f}% of the memory "
            f"they reserved ({used:.0f} of {requested:.0f} MB, peak over m)"
        )
    lines += _over_askers(reserving, top)
    # Killed jobs are the user's own decision, not a fault: listed apart, with their reasons.
    lines += _job_errors("Failed jobs", [r for r in results if not r.success and r.failure != KILLED], top * 4)
    lines += _job_errors("Killed jobs", [r for r in results if r.failure == KILLED], top * 4)
    ran = sorted((r for r in results if r.failure != CANCELLED and _ran(r)), key=lambda r: r.runtime, reverse=True)
    if ran:
        # GPU memory is measured only with NVML: a column only where some job has a figure.
        gpu = any(r.gpu_memory_used is not None for r in ran)
        lines.append("")
        lines.append(
            f"{'job':<14} {'status':<8} {'runtime':>9} {'peak MB':>9} {'asked MB':>9}"
            + (f" {'GPU MB':>9}" if gpu else "")
            + "  command"
        )
        for r in ran[:top]:
            asked = f"{r.memory_requested:.0f}" if r.memory_requested is not None else "-"
            status = "ok" if r.success else "KILLED" if r.failure == KILLED else "FAILED"
            gpu_mb = "-" if r.gpu_memory_used is None else f"{r.gpu_memory_used:.1f}"
            lines.append(
                f"{r.job_id:<14} {status:<8} {r.runtime:8.2f}s "
                f"{r.memory_used:9.1f} {asked:>9}" + (f" {gpu_mb:>9}" if gpu else "") + f"  {shorten(_command(r), 40)}"
            )
        if len(ran) > top:
            lines.append(f"({len(ran) - top} faster jobs not shown)")
    return "\n".join(lines)


def resources_text(
    cpus: int,
    memory: int,
    resources: Optional[Mapping[str, int]] = None,
    gpus: Sequence[Tuple[int, Optional[int]]] = (),
) -> str:
    """What jobs share (CPUs, memory; the named `resources` and `gpus`, each an id and its
    memory in bytes or None, where there are some) beside what this machine has."""
    total, available = machine_memory()
    limit = cgroup_memory_limit()
    lines = [
        "mpmsub resources",
        f"  CPUs:   {cpus} for jobs (this machine: {detect_cpus()} usable, {os.cpu_count()} in all)",
        f"  memory: {format_memory(memory)} for jobs (this machine: {format_memory(total)} total, "
        f"{format_memory(available)} available now"
        + (f", container limit {format_memory(limit)}" if limit else "")
        + ")",
    ]
    if gpus:
        each = ", ".join(str(i) if size is None else f"{i} ({format_memory(size)})" for i, size in gpus)
        lines.append(f"  GPUs:   {len(gpus)} for jobs: {each}")
    if resources:
        lines.append("  named:  " + ", ".join(f"{name} {count}" for name, count in sorted(resources.items())))
    return "\n".join(lines)


def _call_code(spec: JobSpec, memory: str, job_id: Optional[str]) -> str:
    """A Python call as the code that queues it: `mpmsub.Call(fn, 1, x=2).cpu(1).memory('150M')`."""
    call = spec.call
    assert call is not None
    args = [function_name(call.fn), *map(repr, call.args), *(f"{k}={v!r}" for k, v in call.kwargs.items())]
    code = f"mpmsub.Call({', '.join(args)}).cpu({spec.cpus}).memory({memory!r})"
    if job_id is not None:
        code += f".with_id({job_id!r})"
    if spec.timeout is not None:
        code += f".with_timeout({spec.timeout!r})"
    if spec.retries:
        code += f".with_retries({spec.retries}, {spec.memory_growth!r})"
    if spec.strict is not None:
        code += f".strict_memory({spec.strict!r})"
    if spec.priority:
        code += f".with_priority({spec.priority})"
    return code


def profile_text(
    results: List[JobResult],
    specs: Dict[str, JobSpec],
    custom_ids: Set[str],
    cpus: int,
    memory: int,
    snippet: bool = True,
) -> str:
    """The profile table, and (with `snippet`) Python code that queues the jobs with the
    recommended memory."""
    lines = [
        "mpmsub profile: jobs run one at a time; peak memory of each job's whole process tree",
        "",
        f"{'job':<14} {'status':<7} {'runtime':>9} {'peak MB':>9} {'declared':>9} {'recommend':>10}  command",
    ]
    code = [f"p = mpmsub.cluster(p={cpus}, m={format_memory(memory)!r})"]
    for r in results:
        spec = specs[r.job_id]
        rec = recommend_memory(r.memory_used)
        declared = format_memory(spec.memory) if spec.memory is not None else "-"
        status = "ok" if r.success else "KILLED" if r.failure == KILLED else "FAILED"
        lines.append(
            f"{r.job_id:<14} {status:<7} {r.runtime:8.2f}s {r.memory_used:9.1f} "
            f"{declared:>9} {rec:>10}  {shorten(one_line(spec.describe()), 40)}"
        )
        if spec.call is not None:
            code.append(f"p.jobs.append({_call_code(spec, rec, r.job_id if r.job_id in custom_ids else None)})")
            continue
        entry: Dict[str, Any] = {"pipeline": spec.cmd} if spec.is_pipeline else {"cmd": spec.cmd}
        entry.update(p=spec.cpus, m=rec)
        if r.job_id in custom_ids:
            entry["id"] = r.job_id
        entry.update(optional_fields(spec))
        code.append(f"p.jobs.append({entry!r})")
    failed = [r for r in results if not r.success]
    lines += ["", f"Recommended m = measured peak + {PROFILE_BUFFER:.0%}, rounded up."]
    if failed:
        lines.append(f"{len(failed)} job(s) failed; their peaks may be below what a successful run needs.")
    if snippet:
        lines += ["", "Ready to paste:", "", "import mpmsub", *code, "p.run()"]
    return "\n".join(lines)

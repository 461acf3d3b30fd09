"""From what a launcher measured to what a user sees: the JobResult of a run (`make_result`, with
the failure explained), what `result()` raises for a Python call that did not return, and the
hand-over of a final result to its future (`resolve`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, Optional, Type

from mpmsub import _errors
from mpmsub._errors import (
    CallCancelledError,
    CallError,
    CallKilledError,
    CallPicklingError,
    CallTimeoutError,
    MemoryLimitError,
)
from mpmsub._result import CANCELLED, EXIT, KILLED, MEMORY, PICKLE, RAISED, SIGNAL, TIMEOUT, FailureKind, JobResult
from mpmsub._units import MB

if TYPE_CHECKING:
    from mpmsub._engine.delivery import Delivery
    from mpmsub._engine.future import JobFuture
    from mpmsub._launch.base import Outcome
    from mpmsub._learn.estimate import Estimate
    from mpmsub._spec import JobSpec


def make_result(
    spec: JobSpec,
    job_id: str,
    outcome: Outcome,
    attempts: int,
    requeued: int,
    estimate: Optional[Estimate] = None,
) -> JobResult:
    """Turn what a launcher measured into the JobResult users see, with the failure explained."""
    codes = outcome.returncodes
    nonzero = [(i, rc) for i, rc in enumerate(codes) if rc not in (0, None)]
    returncode = nonzero[-1][1] if nonzero else (codes[-1] if codes else None)
    failure, error = outcome.failure, outcome.error
    if failure is None and nonzero:
        index, rc = nonzero[-1]
        where = f" (pipeline stage {index + 1}: {spec.stages[index][0]!r})" if spec.is_pipeline else ""
        who = "its worker process was " if spec.call is not None else ""
        if rc is not None and rc < 0:
            failure, error = SIGNAL, f"{who}killed by signal {_signal_name(-rc)}{where}"
        else:
            who = "its worker process " if spec.call is not None else ""
            failure, error = EXIT, f"{who}exited with status {rc}{where}"
    elif failure is None and spec.call is not None and codes and codes[-1] == 0:
        failure, error = EXIT, "its worker process exited (status 0) during the call"
    return JobResult(
        job_id=job_id,
        cmd=spec.cmd,
        returncode=returncode,
        stdout=outcome.stdout,
        stderr=outcome.stderr,
        runtime=outcome.runtime,
        memory_used=outcome.peak_memory / MB,
        cpu_used=outcome.cpu_time,
        start_time=outcome.start_time,
        end_time=outcome.start_time + outcome.runtime,
        error=error,
        failure=failure,
        cpus=spec.cpus,
        memory_requested=None if spec.memory is None else spec.memory / MB,
        stage_returncodes=list(codes),
        attempts=attempts,
        requeued=requeued,
        memory_series=[(round(t, 3), round(b / MB, 1)) for t, b in outcome.memory_series],
        value=outcome.value,
        exception=outcome.exception,
        memory_estimate=None if estimate is None else estimate.method,
        memory_estimate_runs=0 if estimate is None else estimate.runs,
        host=outcome.host,
        gpus=tuple(outcome.gpus or ()),
        gpu_memory_used=None if outcome.gpu_peak is None else outcome.gpu_peak / MB,
        gpu_memory_requested=None if spec.gpu_memory is None else spec.gpu_memory / MB,
        resources=dict(spec.resources),
    )


def cancelled_again(
    last: JobResult, reason: str, attempts: int, requeued: int, failure: FailureKind = CANCELLED
) -> JobResult:
    """The result of a job whose next run (a retry, or after a requeue) was cancelled (or, with
    `failure` KILLED, killed while it waited for it: `reason` is then the kill's message)."""
    if failure == CANCELLED:
        error = f"{last.error}; cancelled before it could run again: {reason}"
    else:
        error = f"{last.error}; {reason} (before it could run again)"
    return dataclasses.replace(
        last,
        failure=failure,
        error=error,
        attempts=attempts,
        requeued=requeued,
    )


# The exception a call's future fails with, by failure kind (RAISED re-raises the call's own).
_CALL_ERRORS: Dict[str, Type[CallError]] = {
    MEMORY: MemoryLimitError,
    TIMEOUT: CallTimeoutError,
    CANCELLED: CallCancelledError,
    KILLED: CallKilledError,
    PICKLE: CallPicklingError,
}


def call_exception(result: JobResult) -> BaseException:
    """What `result()` raises for a Python call that did not return."""
    if result.failure == RAISED and result.exception is not None:
        return result.exception
    kind = _CALL_ERRORS.get(result.failure or "", _errors.WorkerDiedError)
    error: CallError = kind(f"call {result.job_id!r} ({result.cmd[0]}) failed: {result.error}", result)
    return error


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def resolve(delivery: Delivery, future: JobFuture[Any], spec: JobSpec, result: JobResult) -> None:
    """Hand a job's final result to its future, with its usage: the JobResult for a command;
    for a call, what it returned, or what `result()` raises (call_exception)."""
    future.usage = result
    if spec.call is None:
        delivery.set_result(future, result)
    elif result.success:
        delivery.set_result(future, result.value)
    else:
        delivery.set_exception(future, call_exception(result))

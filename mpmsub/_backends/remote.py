"""A job run elsewhere (on a Dask worker, as a SLURM job) under mpmsub's own engine.

The sending side packs the job's spec (`pack`); the receiving side runs it through a
MemoryAwareExecutor there (`run`), which measures, times out, kills and words the failure
exactly as a local run does, and sends back the Outcome (`Returned`); the sender hands that
Outcome to its own executor as if a local launcher had measured it. Retries and requeues stay
with the sender's executor, which owns the job's future.

`python -m mpmsub _run-job SPEC RESULT` is the SLURM side: it runs the pickled spec in SPEC and
writes its Outcome to RESULT (atomically), and stops the job's whole tree on SIGTERM (scancel), or
when the driver's heartbeat file stops changing (`Heartbeat`: a driver killed with -9 cancels
nothing, and its jobs would run, and its pending jobs start, for no one).
Files cross a shared filesystem, where another user might place or change one, so both ends
trust only what is private to this user: SPEC (the sender's secret key, then the packed job) is
read only from a file of this user in a directory no one else can enter, and RESULT is signed
with that key (HMAC-SHA256 in front of the pickle), which the sender checks before it unpickles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import pickle
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from mpmsub._files import UnsafeFileError
from mpmsub._launch import pool as _workers
from mpmsub._launch.base import Outcome, not_started
from mpmsub._result import CANCELLED, JobResult
from mpmsub._spec import JobSpec
from mpmsub._units import MB

if TYPE_CHECKING:
    from mpmsub._engine.future import JobFuture


def pack(spec: JobSpec, strict: bool, shared: bool, **runner: Any) -> bytes:
    """A job for another machine: retries left to the sender's executor (it owns the future),
    and the executor's strictness decided. A call goes with this process's state (its path,
    directory and main script, which its workers there restore) where the machines share a
    filesystem (`shared`), or else pickled by value where cloudpickle is installed. `runner` is
    the sender's settings (kill_grace, output_limit) for a receiver that runs this job alone."""
    call = spec.call
    preparation = None
    if call is not None:
        if shared:
            preparation = _workers.preparation_data()
        else:
            call = call.portable()
    sent = dataclasses.replace(
        spec, retries=0, job_id=None, strict=strict if spec.strict is None else spec.strict, call=call
    )
    return pickle.dumps((sent, preparation, runner), pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes) -> Tuple[JobSpec, Dict[str, Any]]:
    """The job `pack` made and the sender's settings for its runner, with the sending process's
    state taken up for its workers."""
    spec, preparation, runner = pickle.loads(data)
    if not isinstance(spec, JobSpec):
        raise TypeError(f"expected a pickled mpmsub JobSpec; got {type(spec).__name__}")
    if preparation is not None:
        _workers.inherit(preparation)
    return spec, runner


@dataclass
class Returned:
    """An Outcome on its way back. A call's exception travels with its remote traceback, which
    pickling an exception drops (its __cause__)."""

    outcome: Outcome
    cause: Optional[BaseException] = None

    def received(self) -> Outcome:
        exception = self.outcome.exception
        if exception is not None and self.cause is not None and exception.__cause__ is None:
            exception.__cause__ = self.cause
        return self.outcome


def outcome_of(result: JobResult) -> Outcome:
    """The Outcome that makes the sender's executor build this same JobResult."""
    exception = result.exception
    return Outcome(
        returncodes=list(result.stage_returncodes),
        stdout=result.stdout,
        stderr=result.stderr,
        start_time=result.start_time,
        runtime=result.runtime,
        cpu_time=result.cpu_used,
        peak_memory=round(result.memory_used * MB),
        failure=result.failure,
        error=result.error,
        memory_series=[(t, round(mb * MB)) for t, mb in result.memory_series],
        value=result.value,
        exception=exception,
        host=result.host,
        gpus=tuple(result.gpus),  # the devices it had there, which the sender's executor reports as they are
        gpu_peak=None if result.gpu_memory_used is None else round(result.gpu_memory_used * MB),
    )


def returned(spec: JobSpec, future: JobFuture[object], cancelled: str) -> Returned:
    """What a finished (or cancelled while queued) future of the receiving executor sends back."""
    result = future.usage
    if result is None:  # cancelled before it started
        return Returned(not_started(spec, CANCELLED, cancelled))
    exception = result.exception
    cause = None if exception is None else exception.__cause__
    return Returned(outcome_of(result), cause)


# -- the SLURM side: python -m mpmsub _run-job SPEC RESULT -----------------------------------------

KEY_BYTES = 32  # the secret key at the head of a spec file, which signs its result
_TAG_BYTES = hashlib.sha256().digest_size
REFUSED = 3  # the runner's exit status for a spec file it does not trust


def sign(key: bytes, payload: bytes) -> bytes:
    """A result file's contents: the payload's HMAC-SHA256 under `key`, then the payload."""
    return hmac.new(key, payload, hashlib.sha256).digest() + payload


def verify(key: bytes, data: bytes) -> bytes:
    """The payload of what `sign` made with `key`; UnsafeFileError for anything else (checked
    before anything is unpickled)."""
    tag, payload = data[:_TAG_BYTES], data[_TAG_BYTES:]
    if not hmac.compare_digest(tag, hmac.new(key, payload, hashlib.sha256).digest()):
        raise UnsafeFileError("it is not signed with this run's key (mpmsub's runner for this job did not write it)")
    return payload


# -- the driver's heartbeat ------------------------------------------------------------------------

HEARTBEAT = "heartbeat"  # the file in a run directory that the driver touches while it lives


def beat_interval(timeout: float) -> float:
    """Seconds between two beats of the driver, and two looks of a runner: a few per `timeout`."""
    return min(5.0, timeout / 6)


class Heartbeat:
    """A runner's view of its driver's heartbeat file: stale once unchanged for `timeout` seconds.

    The first look takes the file's age from the clocks (the driver's machine and this one, which
    a cluster keeps close); later looks time it by this machine's clock alone, from the last change
    seen. The file is opened, not stat'ed: NFS checks a file with the server at open
    (close-to-open), where a stat may be answered from its cache for up to a minute."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._seen: Optional[Tuple[float, float]] = None  # (the file's mtime, when it changed: monotonic)

    def stale(self) -> Optional[str]:
        """Why the driver is taken for gone, or None while it beats."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return f"its driver is gone: its run directory's heartbeat file {self.path} was removed"
        except OSError:
            return None  # unreadable for a moment (a busy filesystem): the next look decides
        try:
            mtime = os.fstat(fd).st_mtime
        finally:
            os.close(fd)
        now = time.monotonic()
        if self._seen is None:
            self._seen = (mtime, now - max(0.0, time.time() - mtime))
        elif mtime != self._seen[0]:
            self._seen = (mtime, now)
        age = now - self._seen[1]
        if age <= self.timeout:
            return None
        return (
            f"its driver is gone: its heartbeat file {self.path} has not changed for {age:.1f} s, over its"
            f" heartbeat_timeout of {self.timeout:g} s (the driver was killed, or its machine stopped)"
        )

    def watch(self, on_stale: Callable[[str], Any]) -> Callable[[], None]:
        """Look every beat_interval in a thread of its own; call `on_stale(why)` once, when stale.
        Returns what stops the watch."""
        done = threading.Event()

        def look() -> None:
            while not done.wait(beat_interval(self.timeout)):
                why = self.stale()
                if why is not None:
                    on_stale(why)
                    return

        threading.Thread(target=look, name="mpmsub-heartbeat", daemon=True).start()
        return done.set

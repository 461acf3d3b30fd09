"""The node side of the remote backends: what runs where a job lands, under mpmsub's own engine.

On a Dask worker, `run_on_worker` is the task each job becomes and `kill_on_worker` what the
client's kills run (by `client.run`); one `NodeExecutor` per worker process, sized by the
worker's declared resources, runs the jobs. As a SLURM job, `python -m mpmsub _run-job SPEC
RESULT` runs `main`: one `NodeExecutor` for the one job in SPEC, its Outcome written to RESULT
(see `_remote`, which packs and signs what crosses). This is the only backend module that
imports the engine; the launchers (`_dask`, `_slurm`) name these functions only where they send
them.

Named resources were counted where the job was placed (Dask's resources, SLURM's licenses), so
the executor here never sees them; GPU devices are chosen here, among those this process was
given (`granted_gpus`), so that the job's CUDA_VISIBLE_DEVICES names devices of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import wait
from types import FrameType
from typing import Any, Dict, List, Mapping, Optional, Tuple

from mpmsub._backends.remote import KEY_BYTES, REFUSED, Heartbeat, Returned, returned, sign, unpack
from mpmsub._engine.executor import MemoryAwareExecutor
from mpmsub._engine.future import JobFuture
from mpmsub._errors import MpmsubError
from mpmsub._files import UnsafeFileError, read_private
from mpmsub._launch.base import not_started
from mpmsub._result import CANCELLED, EXIT, SIGNAL, FailureKind
from mpmsub._units import MB, format_memory

logger = logging.getLogger("mpmsub")


class NodeExecutor(MemoryAwareExecutor):
    """The executor that runs jobs for another machine's executor, which owns their futures."""

    def forget_id(self, job_id: str) -> None:
        """Let a finished job's id be used again (a Dask worker runs jobs as long as it lives)."""
        self._inbox.forget(job_id)

    def kill_job(
        self, future: JobFuture[Any], failure: FailureKind, message: str, grace: Optional[float] = None
    ) -> None:
        """Stop the job of `future` (any thread): kill its run, or cancel it while queued."""
        self._kill(future, None, failure, message, grace)


def granted_gpus(environ: Mapping[str, str]) -> Optional[List[int]]:
    """The GPU devices this process was given, by the ids its CUDA_VISIBLE_DEVICES names: SLURM
    sets it for a job's --gres, and a Dask worker that shares its machine's GPUs with others is
    started with its own (as dask-cuda does). None where it is unset, or names devices otherwise
    (by UUID, SLURM's NoDevFiles): every device found here is the executor's."""
    text = environ.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    return [int(part) for part in parts] if all(part.isdigit() for part in parts) else None


def _node_executor(gpus: Optional[List[int]], **options: Any) -> NodeExecutor:
    """A NodeExecutor of the devices `gpus` (None: those it detects when a job first asks). Ids
    that detection here does not list (a device cgroup numbers them otherwise) leave the choice
    to detection, said in a warning."""
    try:
        return NodeExecutor(gpus=gpus, backend="local", history=False, **options)
    except ValueError as exc:
        if gpus is None:
            raise
        logger.warning("mpmsub: CUDA_VISIBLE_DEVICES=%s here, but %s: using the GPUs found here", gpus, exc)
        return NodeExecutor(gpus=None, backend="local", history=False, **options)


# -- on a Dask worker ----------------------------------------------------------------------------

_worker_lock = threading.Lock()
_worker_executor: Optional[NodeExecutor] = None
_worker_jobs: Dict[str, JobFuture[object]] = {}
# Kills that came before their task started: key -> (failure, message, when), kept a minute.
_tombstones: OrderedDict[str, Tuple[FailureKind, str, float]] = OrderedDict()
_TOMBSTONES = 10000


def _executor_here() -> NodeExecutor:
    """This worker process's executor, sized by the worker's declared resources; its GPU devices
    are the worker's own (its CUDA_VISIBLE_DEVICES), or all this machine's, detected when a job
    first asks for one (how many run at once is Dask's count of the worker's GPU resource)."""
    global _worker_executor
    if _worker_executor is None:
        from distributed import get_worker

        from mpmsub._system import detect_cpus, detect_memory

        resources = get_worker().state.total_resources
        cpus = int(resources.get("cpus") or detect_cpus())
        memory = int(resources.get("memory") or detect_memory())
        _worker_executor = _node_executor(granted_gpus(os.environ), cpus=max(1, cpus), memory=memory / MB)
        logger.debug("mpmsub: executor on this Dask worker: %d CPUs, %s", cpus, format_memory(memory))
    return _worker_executor


def run_on_worker(data: bytes, key: str, topic: Optional[str] = None) -> bytes:
    """A Dask task: run one packed job here under mpmsub; return its pickled Outcome, whose host
    is this worker's address (two workers may share a machine). Each run says where it starts
    on `topic` (the submitting launcher's): Dask runs a task again when the worker running it
    dies, and the launcher counts (and stops) such runs."""
    from distributed import get_worker

    worker = get_worker()
    if topic is not None:
        worker.log_event(topic, {"key": key, "worker": worker.address})
    spec, _ = unpack(data)  # the worker's executor keeps its own kill grace
    with _worker_lock:
        executor = _executor_here()
        killed = _tombstones.pop(key, None)
        if killed is not None:
            outcome = not_started(spec, killed[0], killed[1])
            return pickle.dumps(Returned(outcome), pickle.HIGHEST_PROTOCOL)
        # Dask held the job's named resources on this worker: the executor here has none.
        future = executor.submit(dataclasses.replace(spec, job_id=key, resources=()))
        _worker_jobs[key] = future
    try:
        wait([future])
    finally:
        with _worker_lock:
            _worker_jobs.pop(key, None)
        executor.forget_id(key)  # a worker runs jobs for as long as it lives: ids must not pile up
    sent = returned(spec, future, "cancelled before it started on its Dask worker")
    if sent.outcome.host is not None:  # it ran here
        sent.outcome.host = worker.address
    return pickle.dumps(sent, pickle.HIGHEST_PROTOCOL)


RELEASE_WATCH = "mpmsub-release-watch"  # the name the worker plugin below is registered under
_RELEASED = "its Dask task was released by the scheduler (the client that submitted it went away, or cancelled it)"
_CLOSED = "its Dask worker closed"


def _release_watch() -> type:
    """`ReleaseWatch`, made on first use (it subclasses distributed's WorkerPlugin, which the
    SLURM runner, importing this module, need not load): a worker plugin that kills the job of a
    task the scheduler takes back while it runs (its client was killed, disconnected or
    cancelled it), so that a driver's death never leaves its jobs running on the workers."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class ReleaseWatch(WorkerPlugin):
        idempotent = True  # one per worker, whichever client registered it first

        def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
            # On the worker's event loop: the kill waits for the worker's executor, on a thread.
            # (The state machine reports the state asked for, "released", where the task's own
            # state becomes "cancelled" while its function still runs.)
            if start in _RUNNING and finish in _TAKEN_BACK and _ours(key):
                threading.Thread(
                    target=kill_on_worker, args=([(key, CANCELLED, _RELEASED, None)],), daemon=True
                ).start()

        def teardown(self, worker: Any) -> None:
            # The worker closes (it lost its scheduler, say): its tasks' threads, blocked on their
            # jobs, would keep it alive as long as they run. Kills only ask the executor: no wait.
            keys = [key for key in worker.state.tasks if _ours(key)]
            kill_on_worker([(key, CANCELLED, _CLOSED, None) for key in keys])

    ReleaseWatch.__module__ = __name__
    ReleaseWatch.__qualname__ = ReleaseWatch.__name__ = "ReleaseWatch"
    return ReleaseWatch


_RUNNING = ("executing", "long-running")
_TAKEN_BACK = ("released", "cancelled", "forgotten")


def _ours(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("mpmsub-")


def release_watch_plugin() -> Any:
    """A ReleaseWatch, to register with a Dask client (`client.register_plugin`)."""
    return __getattr__("ReleaseWatch")()


def __getattr__(name: str) -> Any:
    # The plugin's class is pickled by reference: a worker finds it here by name.
    if name != "ReleaseWatch":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _worker_lock:
        if "ReleaseWatch" not in globals():
            globals()["ReleaseWatch"] = _release_watch()
    return globals()["ReleaseWatch"]


def kill_on_worker(orders: List[Tuple[str, FailureKind, str, Optional[float]]]) -> List[str]:
    """Run by client.run on every worker with (key, failure, message, grace) orders: kill the
    jobs of those tasks that run here (their keys are returned), and remember the others' kills
    for a while, in case their task starts here in the meantime."""
    killed = []
    now = time.monotonic()
    with _worker_lock:
        while _tombstones and (len(_tombstones) > _TOMBSTONES or next(iter(_tombstones.values()))[2] < now - 60):
            _tombstones.popitem(last=False)
        executor = _worker_executor
        for key, failure, message, grace in orders:
            future = _worker_jobs.get(key)
            if future is None:
                _tombstones[key] = (failure, message, now)
            elif executor is not None:
                executor.kill_job(future, failure, message, grace)
                killed.append(key)
    return killed


# -- as a SLURM job ------------------------------------------------------------------------------


class _Stopped(MpmsubError):
    """SIGTERM or SIGINT reached the runner: the job is to be stopped."""


def main(argv: List[str]) -> int:
    """Run the job in a spec file; write its Outcome to the result file. 0 once written."""
    if len(argv) != 2:
        print("usage: python -m mpmsub _run-job SPEC RESULT", file=sys.stderr)
        return 2
    spec_path, result_path = argv
    try:
        data = read_private(spec_path)  # before anything in it is unpickled
    except UnsafeFileError as exc:
        print(f"mpmsub _run-job: refused the spec file, which is not private to this user: {exc}", file=sys.stderr)
        return REFUSED
    except OSError as exc:
        print(f"mpmsub _run-job: cannot read the spec file {spec_path!r}: {exc}", file=sys.stderr)
        return REFUSED
    key, (spec, runner) = data[:KEY_BYTES], unpack(data[KEY_BYTES:])
    heartbeat = runner.pop("heartbeat", None)  # (path, timeout) of the driver's heartbeat file, if it has one
    watch = None if heartbeat is None else Heartbeat(*heartbeat)
    gone = None if watch is None else watch.stale()
    if gone is not None:  # a pending job that started after its driver died: it is no one's
        return _send(key, Returned(not_started(spec, CANCELLED, f"cancelled before it started: {gone}")), result_path)
    from mpmsub._system import detect_memory

    # SLURM holds the job to its --mem, so its m is strict here: mpmsub stops it first, with
    # its own sentence. The node is SLURM's to share: no gate on this machine's free memory.
    # The sending executor records the run (no history here). SLURM held the job's licenses; its
    # GPUs are those SLURM gave it (--gres: CUDA_VISIBLE_DEVICES), chosen again here so that the
    # result names them.
    executor = _node_executor(
        granted_gpus(os.environ) if spec.gpus else None,
        cpus=spec.cpus,
        memory=(spec.memory or detect_memory()) / MB,
        strict_memory=spec.memory is not None,
        memory_reserve=0,
        **runner,  # kill_grace, output_limit
    )
    spec = dataclasses.replace(spec, resources=())
    stopped: List[str] = []

    def stop(signum: int, frame: Optional[FrameType]) -> None:
        if not stopped:  # the first signal stops the job; later ones wait for that
            stopped.append(signal.Signals(signum).name)
            raise _Stopped()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    future: Optional[JobFuture[object]] = None
    reason = ""
    unwatch = None
    try:
        future = executor.submit(spec)
        if watch is not None:
            unwatch = watch.watch(executor.terminate)  # the job's error: "killed: " and why
        wait([future])
        executor.shutdown(wait=True)
    except _Stopped:
        pass
    if unwatch is not None:
        unwatch()
    if stopped:
        reason = f"SLURM sent {stopped[0]} (scancel, or a limit of its allocation)"
        executor.terminate(reason)  # a running job's error: "killed: " and the reason
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if future is None:  # stopped before the job was queued
        sent = Returned(not_started(spec, CANCELLED, f"cancelled before it started: {reason}"))
    else:
        sent = returned(spec, future, "cancelled before it started")
        if stopped and sent.outcome.failure in (None, EXIT, SIGNAL):
            # SLURM signals every process of the job, not only this runner: the job's own processes
            # may die of it first (a signal failure), or a shell waiting on them then exits 0 or
            # non-zero. The stop decides.
            sent.outcome.failure, sent.outcome.error = CANCELLED, f"killed: {reason}"
    return _send(key, sent, result_path)


def _send(key: bytes, sent: Returned, result_path: str) -> int:
    """Write the signed result file (atomically); 0 once written, or where its run directory is gone."""
    # mkstemp: created exclusively, mode 0600, with a name no one can guess.
    try:
        fd, temporary = tempfile.mkstemp(
            prefix=os.path.basename(result_path) + ".", suffix=".tmp", dir=os.path.dirname(result_path) or "."
        )
    except FileNotFoundError:  # its driver removed its run directory: no one reads the result
        print(f"mpmsub _run-job: no result written: {os.path.dirname(result_path)!r} is gone", file=sys.stderr)
        return 0
    with os.fdopen(fd, "wb") as file:
        file.write(sign(key, pickle.dumps(sent, pickle.HIGHEST_PROTOCOL)))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, result_path)
    return 0

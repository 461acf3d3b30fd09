"""The Dask backend: each job is a Dask task that runs it under mpmsub on a worker.

On the client, a job becomes `client.submit(run_on_worker, ..., resources={"cpus": p, "memory":
bytes}, pure=False)`, so Dask's scheduler places it on a worker whose declared resources hold it
(`dask worker ADDRESS --resources "cpus=4,memory=16e9"`). Dask queues a request no worker can
hold forever and ignores resources no worker declares, so both are refused here first.

On the worker, one MemoryAwareExecutor per worker process (its CPUs and memory are the worker's
declared resources) runs the jobs Dask hands it, as it does locally: the whole tree measured,
timed out and killed, calls in reused worker processes. Dask's own cancel leaves a running
task's subprocesses alive, so a kill goes to the worker's executor by `client.run`; a kill that
arrives before its task starts is remembered and ends the task as soon as it does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pickle
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from mpmsub import _threads
from mpmsub._backends import remote as _remote
from mpmsub._backends.base import Backend, LaunchOptions, Node, largest_fit, most_memory
from mpmsub._launch.base import Handle, Launcher, Outcome, not_started
from mpmsub._result import CANCELLED, ERROR, PICKLE, START, FailureKind
from mpmsub._spec import JobSpec

if TYPE_CHECKING:
    pass

logger = logging.getLogger("mpmsub")

_INSTALL = "the Dask backend needs the distributed package: pip install 'mpmsub[dask]'"
_DECLARE = 'start each worker with its resources: dask worker ADDRESS --nthreads 4 --resources "cpus=4,memory=16e9"'
_REFRESH = 1.0  # seconds a look at the workers' resources is reused for


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ImportError(_INSTALL) from None
    return distributed


class DaskBackend(Backend):
    """Run jobs on a Dask distributed cluster: `DaskBackend("tcp://scheduler:8786")`, or an
    existing `distributed.Client`.

    Workers must declare their resources, `dask worker ADDRESS --nthreads N --resources
    "cpus=N,memory=BYTES"`: a job asks for `cpus` = its p and `memory` = its m in bytes, and
    Dask starts it on a worker that has them free. The executor's budget is, by default, the sum
    of the workers' resources when it starts. `timeout` is the seconds to wait for the scheduler.
    """

    name = "dask"
    lookahead = 8  # measured: 1000 short jobs took 2.9x plain client.submit without, 1.6x with

    def __init__(self, address_or_client: Any, *, timeout: float = 10.0) -> None:
        distributed = _distributed()
        if isinstance(address_or_client, distributed.Client):
            self.address: Optional[str] = None
            self._client: Any = address_or_client
            self._own = False
        elif isinstance(address_or_client, str) and address_or_client.strip():
            self.address = address_or_client.strip()
            self._client = None
            self._own = True
        else:
            raise TypeError(
                "DaskBackend takes a scheduler's address (such as 'tcp://host:8786') or a distributed.Client; "
                f"got {address_or_client!r} ({type(address_or_client).__name__})"
            )
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise ValueError(f"invalid timeout {timeout!r}: expected a number of seconds above 0, at most 86400")
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._nodes: List[Node] = []
        self._seen = -_REFRESH  # monotonic time of the last look at the workers

    def __repr__(self) -> str:
        return f"mpmsub.DaskBackend({self._where()!r})"

    @property
    def client(self) -> Any:
        """The distributed.Client jobs are submitted through (connected on first use)."""
        with self._lock:
            if self._client is None:
                distributed = _distributed()
                try:
                    self._client = distributed.Client(self.address, timeout=self.timeout, set_as_default=False)
                except (OSError, asyncio.TimeoutError) as exc:  # TimeoutError is an OSError from 3.11 on
                    raise OSError(f"cannot reach the Dask scheduler at {self.address!r}: {exc}") from exc
            return self._client

    def nodes(self, fresh: bool = False) -> List[Node]:
        """The workers that declare both `cpus` and `memory` resources."""
        now = time.monotonic()
        if fresh or now - self._seen >= _REFRESH:
            info = self._scheduler_info()
            nodes = []
            for address, worker in info.get("workers", {}).items():
                resources = worker.get("resources") or {}
                if "cpus" in resources and "memory" in resources:
                    nodes.append(Node(address, int(resources["cpus"]), int(resources["memory"])))
            self._nodes, self._seen = nodes, now
        return self._nodes

    def _scheduler_info(self) -> Dict[str, Any]:
        try:
            return self.client.scheduler_info(n_workers=-1)  # type: ignore[no-any-return]  # every worker
        except TypeError:  # releases before 2025 list every worker without being asked
            return self.client.scheduler_info()  # type: ignore[no-any-return]

    def capacity(self) -> Optional[Tuple[int, int]]:
        nodes = self.nodes(fresh=True)
        if not nodes:
            count = len(self._scheduler_info().get("workers", {}))
            raise ValueError(
                f"no worker of the Dask cluster at {self._where()} declares 'cpus' and 'memory' resources "
                f"({count} worker(s) connected), so Dask would ignore every job's size: {_DECLARE}"
            )
        return sum(node.cpus for node in nodes), sum(node.memory for node in nodes)

    def why_never_fits(self, spec: JobSpec) -> Optional[str]:
        return largest_fit(spec, self.nodes(), "Dask worker")

    def place_memory(self, cpus: int) -> Optional[int]:
        return most_memory(self.nodes(), cpus)

    def launcher(self, options: LaunchOptions) -> Launcher:
        return DaskLauncher(self, options)

    def close(self) -> None:
        with self._lock:
            if self._own and self._client is not None:
                self._client.close()
                self._client = None

    def _where(self) -> str:
        if self.address is not None:
            return self.address
        scheduler = getattr(self._client, "scheduler", None)
        return str(getattr(scheduler, "address", None) or self._client)


class DaskLauncher(Launcher):
    """Starts jobs as Dask tasks. One thread takes their results as they come, which Dask's
    `as_completed` fetches concurrently (a done-callback fetching each result in turn would wait
    a round trip to a worker per job)."""

    local = False

    def __init__(self, backend: DaskBackend, options: LaunchOptions) -> None:
        distributed = _distributed()
        self.backend = backend
        self.client = backend.client
        self.strict = options.strict_memory
        self._completed = distributed.as_completed(loop=self.client.loop, with_results=True, raise_errors=False)
        from mpmsub._backends import node  # the node side: its plugin is sent to the workers by reference

        # Each worker kills a job whose task the scheduler takes back (its client died, say).
        self.client.register_plugin(node.release_watch_plugin(), name=node.RELEASE_WATCH)
        # Each run of a task says where it starts: a second start is Dask running it again after
        # its worker died, which mpmsub stops and counts as a failed run (see _started).
        self._topic = f"mpmsub-runs-{uuid.uuid4().hex}"
        self.client.subscribe_topic(self._topic, self._started)
        self._handles: Dict[str, DaskHandle] = {}
        self._cond = threading.Condition()
        self._closing = False
        # Kills waiting for the killer thread: handle, failure, message, grace.
        self._kills: List[Tuple[DaskHandle, FailureKind, str, Optional[float]]] = []
        # Started now, with the executor: jobs that end a program without shutdown() run at
        # interpreter shutdown, when Python 3.12.0-3.12.2 start no thread.
        self._reader = _threads.start(self._read, "mpmsub-dask")
        self._killer = _threads.start(self._kill, "mpmsub-dask-kill")
        if self._reader is None or self._killer is None:
            raise RuntimeError("cannot start mpmsub's Dask threads: the interpreter is shutting down")

    def why_never_fits(self, spec: JobSpec) -> Optional[str]:
        return self.backend.why_never_fits(spec)

    def start(self, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None]) -> Handle:
        handle = DaskHandle(self, spec, job_id, on_exit)
        resources = {"cpus": spec.cpus, "memory": spec.memory or 0}
        if spec.cwd is None and spec.call is None:
            # As here and under SLURM: a command without a cwd runs in the submitting process's
            # directory, not the worker's (the workers' machines must have it: see _outcome).
            try:
                spec = dataclasses.replace(spec, cwd=os.getcwd())
            except OSError as exc:
                why = f"this process's working directory is gone ({exc.strerror}): give the job a cwd"
                on_exit(not_started(spec, START, why))
                handle._ended = True
                return handle
        data = _remote.pack(spec, self.strict, shared=False)
        from mpmsub._backends.node import run_on_worker  # the node side: sent to the worker by reference

        future = self.client.submit(
            run_on_worker, data, handle.key, self._topic, key=handle.key, resources=resources, pure=False
        )
        handle.future = future
        with self._cond:
            self._handles[handle.key] = handle
            self._completed.add(future)
            self._cond.notify_all()  # the reader, not the killer, which waits on the same condition
        return handle

    def _read(self) -> None:
        while True:
            with self._cond:
                while self._completed.is_empty():
                    if self._closing:
                        return
                    self._cond.wait()
            try:
                future, result = next(self._completed)
            except StopIteration:
                continue
            with self._cond:
                handle = self._handles.pop(future.key, None)
            if handle is not None:
                handle.finish(future, result)

    def where(self, handles: Sequence[Handle]) -> List[str]:
        """The address of the worker each task is given to (where it may still wait for the
        worker's resources), or "waiting in Dask" before the scheduler has given it to one."""
        try:
            processing = self.client.processing()
        except Exception as exc:  # the scheduler cannot be asked now
            return [f"Dask (unknown: {exc!r})"] * len(handles)
        at = {key: worker for worker, keys in processing.items() for key in keys}
        return [at.get(getattr(handle, "key", ""), "waiting in Dask") for handle in handles]

    def _started(self, event: Any) -> None:
        """A run of a task began on a worker (on the client's event loop). A second run of one
        task is Dask's own retry after the worker running it died: it is stopped, and the job's
        run ends as an error, which the job's retries (with_retries) then decide on, each run
        counted in its attempts, its history and its trace."""
        try:
            _, message = event
            key, worker = message["key"], message["worker"]
        except (TypeError, ValueError, KeyError):
            return
        with self._cond:
            handle = self._handles.get(key)
        if handle is None:
            return
        before, handle.worker = handle.worker, worker
        if before is not None:
            lost = f"its Dask worker {before} died while it ran (Dask started it again on {worker}: stopped)"
            handle.kill(ERROR, lost, 0)

    def kill_later(self, handle: DaskHandle, failure: FailureKind, message: str, grace: Optional[float]) -> None:
        """Kill on the workers, from a thread of ours (client.run waits for the workers' answers),
        all the kills asked for meanwhile in one call."""
        with self._cond:
            self._kills.append((handle, failure, message, grace))
            self._cond.notify_all()

    def _kill(self) -> None:
        while True:
            with self._cond:
                while not self._kills:
                    if self._closing:
                        return
                    self._cond.wait()
                kills, self._kills = self._kills, []
            orders = [(handle.key, failure, message, grace) for handle, failure, message, grace in kills]
            killed: Set[str] = set()
            from mpmsub._backends.node import kill_on_worker

            try:
                answers = self.client.run(kill_on_worker, orders, on_error="return")
                for answer in answers.values():
                    if isinstance(answer, list):
                        killed.update(answer)
            except Exception:
                logger.exception("mpmsub: could not reach the Dask workers to kill %d job(s)", len(orders))
            for handle, *_ in kills:
                if handle.key not in killed:  # still queued in Dask (a late start meets its tombstone)
                    try:
                        handle.future.cancel()
                    except Exception:
                        logger.exception("mpmsub: could not cancel the Dask task %s", handle.key)

    def close(self) -> None:
        try:
            self.client.unsubscribe_topic(self._topic)
        except Exception:  # the client is gone: nothing to tell it
            logger.debug("mpmsub: could not unsubscribe from %s", self._topic, exc_info=True)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            threads = [self._reader, self._killer]
        for thread in threads:
            if thread is not None:
                thread.join()


class DaskHandle(Handle):
    def __init__(self, launcher: DaskLauncher, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None]) -> None:
        self.launcher = launcher
        self.spec = spec
        self.key = f"mpmsub-{job_id}-{uuid.uuid4().hex[:12]}"
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._ended = False
        self._killed: Optional[Tuple[FailureKind, str]] = None
        self.future: Any = None
        self.worker: Optional[str] = None  # where its last run started (on the client's loop)

    def finish(self, future: Any, result: Any) -> None:
        """The task is over: `result` is what it returned, or (type, exception, traceback) for
        an error, or the CancelledError of a cancelled task."""
        outcome = self._outcome(future.status, result)
        with self._lock:
            if self._ended:
                return
            self._ended = True
        future.release()  # the result is ours now: the cluster may forget it
        self._on_exit(outcome)

    def _outcome(self, status: str, result: Any) -> Outcome:
        if status == "finished":
            try:
                sent = pickle.loads(result)
                received: Outcome = sent.received()
                if self.spec.cwd is None and (received.error or "").startswith("working directory not found"):
                    received.error = (
                        f"{received.error} on its Dask worker: a job without a cwd runs in the submitting "
                        "process's directory, which the worker's machine must have (or give the job a cwd)"
                    )
                return received
            except Exception as exc:  # what came back cannot be read here
                return not_started(self.spec, PICKLE, f"its result could not be received: {exc!r}")
        if status == "cancelled" or self._killed is not None:
            failure, message = self._killed or (CANCELLED, "its Dask task was cancelled")
            return not_started(self.spec, failure, message)
        error = result[1] if isinstance(result, tuple) and len(result) == 3 else result
        return not_started(self.spec, ERROR, f"its Dask task failed: {type(error).__name__}: {error}")

    def kill(self, failure: FailureKind, message: str, grace: Optional[float] = None) -> bool:
        with self._lock:
            if self._ended or self._killed is not None:
                return False
            self._killed = (failure, message)
        self.launcher.kill_later(self, failure, message, grace)
        return True

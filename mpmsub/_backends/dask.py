"""The Dask backend: each job is a Dask task that runs it under mpmsub on a worker.

On the client, a job becomes `client.submit(run_on_worker, ..., resources={"cpus": p, "memory":
bytes, "GPU": n, NAME: count}, pure=False)`, so Dask's scheduler places it on a worker whose
declared resources hold it (`dask worker ADDRESS --resources "cpus=4,memory=16e9,GPU=2"`): its
GPUs and the named resources it holds are counted by Dask, per worker. Dask queues a request no
worker can hold forever and ignores resources no worker declares, so both are refused here first.

On the worker, one MemoryAwareExecutor per worker process (its CPUs and memory are the worker's
declared resources) runs the jobs Dask hands it, as it does locally: the whole tree measured, timed
out and killed, calls in reused worker processes, GPU devices chosen among the worker's. Dask's own
cancel leaves a running task's subprocesses alive, so a kill goes to the worker's executor by
`client.run`; a kill that arrives before its task starts is remembered and ends the task as soon as
it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from mpmsub import _threads
from mpmsub._backends import remote as _remote
from mpmsub._backends.base import GPU, Backend, LaunchOptions, Node, largest_fit, most_memory, seconds
from mpmsub._launch.base import Handle, Launcher, Outcome, not_started
from mpmsub._result import CANCELLED, ERROR, PICKLE, START, FailureKind
from mpmsub._spec import JobSpec
from mpmsub._units import format_memory

if TYPE_CHECKING:
    pass

logger = logging.getLogger("mpmsub")

_INSTALL = "the Dask backend needs the distributed package: pip install 'mpmsub[dask]'"
_DECLARE = 'start each worker with its resources: dask worker ADDRESS --nthreads 4 --resources "cpus=4,memory=16e9"'
_KIND = "Dask worker"
_REFRESH = 1.0  # seconds a look at the workers' resources is reused for
_NO_WORKER = "waiting for a Dask worker (none is connected)"
_IMPORTABLE = (
    "install the module on the workers, or send it with client.upload_file(PATH) "
    "(modules in the script's own directory go with each call)"
)
_LOST = "scheduler-connection-lost"  # the reason of the tasks a client cancels when it loses its scheduler


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
    "cpus=N,memory=BYTES"`: a job asks for `cpus` = its p and `memory` = its m in bytes, `GPU` =
    its GPUs and each named resource it holds, and Dask starts it on a worker that has them free (a
    worker with GPUs or named resources declares them too: "...,GPU=2,licence=1"). The executor's
    budget is, by default, the sum of the workers' resources when it starts; given `cpus` and
    `memory` are a cap, and with them the executor starts with no worker connected (an adaptive
    cluster): its jobs wait for workers.
    `timeout` is the seconds to wait for the scheduler. `worker_grace` is the seconds a job that
    no connected worker can hold any more (its worker left) waits for one that can, before it
    fails as an error (which `with_retries` decides on).
    """

    name = "dask"
    lookahead = 8  # measured: 1000 short jobs took 2.9x plain client.submit without (1.6x with, before grouped starts)

    def __init__(self, address_or_client: Any, *, timeout: float = 10.0, worker_grace: float = 30.0) -> None:
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
        self.timeout = seconds(
            "timeout", timeout, lambda s: 0 < s <= 86400, "a number of seconds above 0, at most 86400"
        )
        self.worker_grace = seconds(
            "worker_grace", worker_grace, lambda s: 0 <= s <= 86400, "a number of seconds from 0 to 86400"
        )
        self.connected = 0  # workers connected at the last look, declaring resources or not
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
        """The workers that declare both `cpus` and `memory` resources (and what else they declare)."""
        now = time.monotonic()
        if fresh or now - self._seen >= _REFRESH:
            info = self._scheduler_info()
            nodes = []
            workers = info.get("workers", {})
            for address, worker in workers.items():
                resources = worker.get("resources") or {}
                if "cpus" in resources and "memory" in resources:
                    others = {name: int(amount) for name, amount in resources.items() if name not in _SIZE}
                    nodes.append(Node(address, int(resources["cpus"]), int(resources["memory"]), others))
            self._nodes, self.connected, self._seen = nodes, len(workers), now
        return self._nodes

    def _scheduler_info(self) -> Dict[str, Any]:
        try:
            return self.client.scheduler_info(n_workers=-1)  # type: ignore[no-any-return]  # every worker
        except TypeError:  # releases before 2025 list every worker without being asked
            return self.client.scheduler_info()  # type: ignore[no-any-return]

    def capacity(self) -> Optional[Tuple[int, int]]:
        self.check()
        nodes = self.nodes()
        if not nodes:
            raise ValueError(
                f"no worker is connected to the Dask cluster at {self._where()}, so there is nothing to size "
                "the executor by: give it cpus= and memory= (the most its jobs take at once), and its jobs "
                "wait for workers to join (as an adaptive cluster starts them)"
            )
        return sum(node.cpus for node in nodes), sum(node.memory for node in nodes)

    def check(self) -> None:
        """Workers connected must declare their resources; none connected is fine (they may join)."""
        if not self.nodes(fresh=True) and self.connected:
            raise ValueError(
                f"no worker of the Dask cluster at {self._where()} declares 'cpus' and 'memory' resources "
                f"({self.connected} worker(s) connected), so Dask would ignore every job's size: {_DECLARE}"
            )

    def why_never_fits(self, spec: JobSpec) -> Optional[str]:
        if spec.gpu_memory is not None:
            # A worker's GPU resource counts devices: Dask cannot hold a job to memory on each.
            return (
                f"it asks for {format_memory(spec.gpu_memory)} on each of its GPUs, sharing them, but on Dask "
                f"a job gets whole GPUs (a worker's {GPU} resource counts devices): ask gpu(n) without memory"
            )
        if GPU in dict(spec.resources):
            return f"its resource {GPU!r} is Dask's name for GPUs: ask for GPUs with gpu(n), or name it otherwise"
        nodes = self.nodes()
        if not nodes and not self.connected:
            return None  # no worker yet: the job waits for one (DaskLauncher says so)
        return largest_fit(spec, nodes, _KIND)

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


_SIZE = ("cpus", "memory")  # the resources every worker declares (Node's own fields)


def task_resources(spec: JobSpec) -> Dict[str, float]:
    """The Dask resources of a job's task: what Dask holds of its worker while it runs."""
    resources: Dict[str, float] = {"cpus": spec.cpus, "memory": spec.memory or 0}
    if spec.gpus:
        resources[GPU] = spec.gpus
    resources.update(spec.resources)
    return resources


_modules_seen = 0  # how many modules were loaded at the last look for the user's own
_PREFIXES = {sys.prefix, sys.base_prefix, sys.exec_prefix}  # Python's own and the environment's modules


def _send_own_modules() -> None:
    """Have cloudpickle send by value (with each call) the modules and packages of the script's
    directory, such as a `mylib.py` beside the script, which a worker elsewhere cannot import.
    Other modules must be importable on the workers (see _IMPORTABLE)."""
    global _modules_seen
    modules = dict(sys.modules)
    if len(modules) == _modules_seen:
        return
    _modules_seen = len(modules)
    try:
        import cloudpickle  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return
    main = getattr(modules.get("__main__"), "__file__", None)
    home = os.path.dirname(os.path.abspath(main)) if main else os.getcwd()
    installed = tuple(os.path.join(os.path.abspath(prefix), "") for prefix in _PREFIXES)
    for name, module in modules.items():
        path = getattr(module, "__file__", None)
        # Top-level modules only: a package sent by value takes its submodules along. mpmsub
        # itself (a checkout beside the script) goes by reference: its classes must stay its own.
        if "." in name or name in ("__main__", "mpmsub") or not path:
            continue
        path = os.path.abspath(path)
        if path.startswith(installed) or "site-packages" in path or "dist-packages" in path:
            continue
        where = os.path.dirname(path)
        if os.path.basename(path).startswith("__init__."):  # a package: where its directory is
            where = os.path.dirname(where)
        if where == home:
            with contextlib.suppress(ValueError):  # (unloaded meanwhile)
                cloudpickle.register_pickle_by_value(module)


# The launchers of each client (by id) told of workers joining and leaving: the scheduler says
# both on its "all" topic, and a client keeps one handler per topic, which hands them on.
_watching_lock = threading.Lock()
_watching: Dict[int, Tuple[Any, List[DaskLauncher], Callable[[Any], None]]] = {}
_WORKER_ACTIONS = ("add-worker", "remove-worker")


def _watch_workers(launcher: DaskLauncher) -> None:
    client = launcher.client
    with _watching_lock:
        entry = _watching.get(id(client))
        if entry is None:
            entry = _watching[id(client)] = (client, [], lambda event: _workers_changed(client, event))
        if launcher not in entry[1]:
            entry[1].append(launcher)
        # (Again after a new scheduler, which knows nothing of the last one's subscriptions.)
        client.subscribe_topic("all", entry[2])


def _unwatch_workers(launcher: DaskLauncher) -> None:
    client = launcher.client
    with _watching_lock:
        entry = _watching.get(id(client))
        if entry is None or launcher not in entry[1]:
            return
        entry[1].remove(launcher)
        if entry[1]:
            return
        del _watching[id(client)]
    try:
        client.unsubscribe_topic("all")
    except Exception:  # the client is gone: nothing to tell it
        logger.debug("mpmsub: could not unsubscribe from the Dask scheduler's events", exc_info=True)


def _workers_changed(client: Any, event: Any) -> None:
    """An event of the scheduler's "all" topic (on the client's event loop)."""
    try:
        action = event[1]["action"]
    except (TypeError, IndexError, KeyError):
        return
    if action in _WORKER_ACTIONS:
        with _watching_lock:
            entry = _watching.get(id(client))
            launchers = [] if entry is None else list(entry[1])
        for launcher in launchers:
            launcher.look_at_workers()


class DaskLauncher(Launcher):
    """Starts jobs as Dask tasks. One thread takes their results as they come: each time, every
    task ended since the last time (Dask's `as_completed` batches), their results in one gather
    (a done-callback fetching each result in turn would wait a round trip per job)."""

    local = False
    defers_start = True  # a task may wait in Dask for a worker: cancel() takes it back until it begins
    groups_starts = True  # flush() hands Dask the round's tasks in one graph per job size

    def __init__(self, backend: DaskBackend, options: LaunchOptions) -> None:
        distributed = _distributed()
        self.backend = backend
        self.client = backend.client
        self.strict = options.strict_memory
        self._completed = distributed.as_completed(loop=self.client.loop)
        self._topic = f"mpmsub-runs-{uuid.uuid4().hex}"
        # Task keys: the job's id, this launcher's tag and a count (one random tag, not one per
        # job: a key must be unique in the cluster, also across executors and retries).
        self._tag, self._count = uuid.uuid4().hex[:8], itertools.count()
        self._reader_idle = False  # the reader waits for a task to follow (flush() wakes it)
        self._pending: List[Tuple[DaskHandle, bytes]] = []  # started in this round: for flush()
        self._handles: Dict[str, DaskHandle] = {}
        self._cond = threading.Condition()
        self._closing = False
        # Kills waiting for the killer thread: handle, failure, message, grace.
        self._kills: List[Tuple[DaskHandle, FailureKind, str, Optional[float]]] = []
        # The killer thread also looks at the workers when they change, and when a job that no
        # connected worker can hold has waited worker_grace for one (then: _deadline).
        self._look = False
        self._deadline: Optional[float] = None
        self._alone = False  # no worker was connected at the last look: said so once
        self._rejoining = False  # the scheduler was lost: a thread registers with the next one
        self._register()
        # Started now, with the executor: jobs that end a program without shutdown() run at
        # interpreter shutdown, when Python 3.12.0-3.12.2 start no thread.
        self._reader = _threads.start(self._read, "mpmsub-dask")
        self._killer = _threads.start(self._kill, "mpmsub-dask-kill")
        if self._reader is None or self._killer is None:
            raise RuntimeError("cannot start mpmsub's Dask threads: the interpreter is shutting down")

    def _register(self) -> None:
        """Tell the scheduler (again, after a new one) what mpmsub needs of it. Subscriptions
        wait in a reconnecting client for its new connection; the plugin's registration waits
        for the scheduler itself (the client's connect timeout at most)."""
        from mpmsub._backends import node  # the node side: its plugin is sent to the workers by reference

        # Each run of a task says where it starts: a second start is Dask running it again after
        # its worker died, which mpmsub stops and counts as a failed run (see _started).
        self.client.subscribe_topic(self._topic, self._started)
        _watch_workers(self)
        # Each worker kills a job whose task the scheduler takes back (its client died, say).
        self.client.register_plugin(node.release_watch_plugin(), name=node.RELEASE_WATCH)

    def scheduler_lost(self) -> None:
        """The client lost its scheduler (any thread): register with the next one it reaches, on
        a thread of its own, which close() does not wait for."""
        with self._cond:
            if self._rejoining or self._closing:
                return
            self._rejoining = True
        if _threads.start(self._rejoin, "mpmsub-dask-rejoin") is None:  # (at interpreter shutdown)
            self._rejoining = False

    def _rejoin(self) -> None:
        try:
            self._register()
        except Exception as exc:
            if not self._closing:
                logger.warning(
                    "mpmsub: could not register with the Dask scheduler at %s: %r", self.backend._where(), exc
                )
        finally:
            with self._cond:
                self._rejoining = False

    def why_never_fits(self, spec: JobSpec) -> Optional[str]:
        return self.backend.why_never_fits(spec)

    def start(self, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None]) -> Handle:
        """Make the job's task, handed to Dask by `flush` with the others of this round."""
        handle = DaskHandle(self, spec, job_id, on_exit, f"mpmsub-{job_id}-{self._tag}{next(self._count)}")
        if spec.cwd is None and spec.call is None:
            # As here and under SLURM: a command without a cwd runs in the submitting process's
            # directory, not the worker's (the workers' machines must have it: see _outcome).
            try:
                spec = dataclasses.replace(spec, cwd=os.getcwd())
            except OSError as exc:
                why = f"this process's working directory is gone ({exc.strerror}): give the job a cwd"
                handle.end_unstarted(START, why)
                return handle
        if spec.call is not None:
            _send_own_modules()
        self._pending.append((handle, _remote.pack(spec, self.strict, shared=False)))
        return handle

    def flush(self) -> None:
        """Hand Dask the tasks of this round's jobs: one `client.map` per size of job (its Dask
        resources), as one graph; a submit per job costs the scheduler a graph update each
        (measured: 1000 `true` jobs took 1.9x plain client.submit that way, 1.2x so)."""
        from mpmsub._backends.node import run_on_worker  # the node side: sent to the worker by reference

        groups: Dict[Tuple[Tuple[str, float], ...], List[Tuple[DaskHandle, bytes]]] = {}
        for handle, data in self._pending:
            if handle._killed is not None:  # killed before it was handed over: it never runs
                handle.end_unstarted(*handle._killed)
                continue
            size = tuple(task_resources(handle.spec).items())
            groups.setdefault(size, []).append((handle, data))
        self._pending = []
        for size, group in groups.items():
            keys = [handle.key for handle, _ in group]
            with self._cond:  # before the graph goes: a run's start may come back at once
                for handle, _ in group:
                    self._handles[handle.key] = handle
            try:
                futures = self.client.map(
                    run_on_worker,
                    [data for _, data in group],
                    keys,
                    [self._topic] * len(group),
                    key=keys,
                    resources=dict(size),
                    pure=False,
                )
            except Exception as exc:  # the client closed (it lost its scheduler, and found none again)
                why = f"it could not be handed to the Dask scheduler at {self.backend._where()}: {exc}"
                for handle, _ in group:
                    with self._cond:
                        self._handles.pop(handle.key, None)
                    handle.end_unstarted(ERROR, why)
                continue
            # A job no worker known can hold (its worker left before it came: a retry, say) has
            # the killer look, which fails it after worker_grace unless one that can joins.
            nodes, connected = self.backend._nodes, self.backend.connected
            unplaced = connected and largest_fit(group[0][0].spec, nodes, _KIND) is not None
            with self._cond:
                for (handle, _), future in zip(group, futures):
                    handle.future = future
                self._completed.update(futures)
                # Threads woken only when needed: a wake-up per job contends for the GIL with
                # Dask's own thread, whose pace is the batch's.
                look = unplaced or not connected
                if self._reader_idle or (look and not self._look):
                    self._look = self._look or look  # to fail it in time, or say that it waits for a worker
                    self._cond.notify_all()  # the reader, and the killer to look

    def _read(self) -> None:
        while True:
            with self._cond:
                while self._completed.is_empty():
                    if self._closing:
                        return
                    self._reader_idle = True
                    self._cond.wait()
                    self._reader_idle = False
            batch = self._completed.next_batch(block=True)
            results = self._gather(batch)
            for future in batch:
                with self._cond:
                    handle = self._handles.pop(future.key, None)
                if handle is not None:
                    handle.finish(future, results[future.key])

    def _gather(self, futures: List[Any]) -> Dict[str, Any]:
        """What each of these ended tasks gave, by key: its return value, or as Dask's
        as_completed(with_results=True, raise_errors=False) gives a failure ((type, exception,
        traceback)) or a cancel (the CancelledError). The finished ones' values come in one
        gather (one per task would cost a round trip through the scheduler each: measured, 1000
        short jobs took 1.3x as long)."""
        finished = [future for future in futures if future.status == "finished"]
        results: Dict[str, Any] = {}
        if finished:
            try:
                results = dict(zip([future.key for future in finished], self.client.gather(finished)))
            except Exception:  # one was lost meanwhile (its worker died): each on its own below
                logger.debug("mpmsub: could not gather %d Dask results at once", len(finished), exc_info=True)
        for future in futures:
            if future.key not in results:
                try:
                    results[future.key] = self.client.sync(future._result, raiseit=False)
                except Exception as exc:
                    results[future.key] = exc
        return results

    def where(self, handles: Sequence[Handle]) -> List[str]:
        """The address of the worker each task is given to (where it may still wait for the
        worker's resources), or "waiting in Dask" before the scheduler has given it to one (or
        _NO_WORKER)."""
        try:
            processing = self.client.processing()
        except Exception as exc:  # the scheduler cannot be asked now
            return [f"Dask (unknown: {exc!r})"] * len(handles)
        at = {key: worker for worker, keys in processing.items() for key in keys}
        waiting = "waiting in Dask" if processing else _NO_WORKER
        return [at.get(getattr(handle, "key", ""), waiting) for handle in handles]

    def look_at_workers(self) -> None:
        """Workers joined or left (any thread): the killer thread looks at them."""
        with self._cond:
            self._look = True
            self._cond.notify_all()

    def _looked(self) -> None:
        """Fail the jobs that no connected worker has been able to hold for worker_grace (their
        worker left), naming their size and the largest worker's, as a submit refuses them. With
        no worker connected at all, jobs wait (an adaptive cluster starts workers for them)."""
        try:
            nodes = self.backend.nodes(fresh=True)
        except Exception:  # the scheduler cannot be asked now: its loss ends the runs (see finish)
            logger.debug("mpmsub: could not look at the Dask workers", exc_info=True)
            return
        with self._cond:
            handles = [handle for handle in self._handles.values() if handle.future is not None]
        now, grace, connected = time.monotonic(), self.backend.worker_grace, self.backend.connected
        alone, self._alone = self._alone, not connected and bool(handles)
        if self._alone and not alone:
            logger.warning(
                "mpmsub: no worker is connected to the Dask cluster at %s: %d job(s) wait for one to join",
                self.backend._where(),
                len(handles),
            )
        deadlines = []
        for handle in handles:
            why = largest_fit(handle.spec, nodes, _KIND) if connected else None
            if why is None:
                handle.unplaced = None
                continue
            if handle.unplaced is None:
                handle.unplaced = now
            if now - handle.unplaced < grace:
                deadlines.append(handle.unplaced + grace)
                continue
            handle.kill(
                ERROR,
                f"no connected Dask worker can hold it any more, and none that can joined within {grace:g} s "
                f"(DaskBackend's worker_grace): {why}",
                0,
            )
        self._deadline = min(deadlines, default=None)

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
        if before is None:
            self.on_begin(handle.job_id)
        else:
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
                while not self._kills and not self._look:
                    if self._closing:
                        return
                    wait = None if self._deadline is None else self._deadline - time.monotonic()
                    if wait is not None and wait <= 0:
                        self._look = True
                    else:
                        self._cond.wait(wait)
                kills, self._kills = self._kills, []
                look, self._look = self._look, False
            if look:
                self._looked()
            if kills:
                self._send_kills(kills)

    def _send_kills(self, kills: List[Tuple[DaskHandle, FailureKind, str, Optional[float]]]) -> None:
        orders = [(handle.key, failure, message, grace) for handle, failure, message, grace in kills]
        killed: Set[str] = set()
        from mpmsub._backends.node import kill_on_worker

        try:
            answers = self.client.run(kill_on_worker, orders, on_error="return")
            for answer in answers.values():
                if isinstance(answer, list):
                    killed.update(answer)
        except Exception as exc:  # (no scheduler: its loss ends the runs, and the workers kill them)
            logger.warning("mpmsub: could not reach the Dask workers to kill %d job(s): %r", len(orders), exc)
        for handle, *_ in kills:
            if handle.key not in killed:  # still queued in Dask (a late start meets its tombstone)
                try:
                    handle.future.cancel()
                except Exception as exc:
                    logger.warning("mpmsub: could not cancel the Dask task %s: %r", handle.key, exc)

    def close(self) -> None:
        _unwatch_workers(self)
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
    def __init__(
        self, launcher: DaskLauncher, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None], key: str
    ) -> None:
        self.launcher = launcher
        self.spec = spec
        self.job_id = job_id
        self.key = key
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._ended = False
        self._killed: Optional[Tuple[FailureKind, str]] = None
        self.future: Any = None
        self.worker: Optional[str] = None  # where its last run started (on the client's loop)
        self.unplaced: Optional[float] = None  # since when no connected worker can hold it (killer thread)

    def end_unstarted(self, failure: FailureKind, error: str) -> None:
        """End before its task was handed to Dask (on the loop: nothing else touches it then)."""
        self._ended = True
        self._on_exit(not_started(self.spec, failure, error))

    def finish(self, future: Any, result: Any) -> None:
        """The task is over: `result` is what it returned, or (type, exception, traceback) for
        an error, or the CancelledError of a cancelled task."""
        outcome = self._outcome(future.status, result)
        with self._lock:
            if self._ended:
                return
            self._ended = True
        if self._lost(result):
            self.launcher.scheduler_lost()
        try:
            future.release()  # the result is ours now: the cluster may forget it
        except Exception:  # a closed client holds nothing
            logger.debug("mpmsub: could not release the Dask task %s", self.key, exc_info=True)
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
                elif received.failure == PICKLE and "No module named" in (received.error or ""):
                    received.error = f"{received.error} on its Dask worker: {_IMPORTABLE}"
                return received
            except Exception as exc:  # what came back cannot be read here
                return not_started(self.spec, PICKLE, f"its result could not be received: {exc!r}")
        if self._lost(result):
            # The workers close too, and their ReleaseWatch kills the jobs: an error, which the
            # job's retries decide on.
            where = self.launcher.backend._where()
            return not_started(self.spec, ERROR, f"the connection to its Dask scheduler at {where} was lost")
        if status == "cancelled" or self._killed is not None:
            failure, message = self._killed or (CANCELLED, "its Dask task was cancelled")
            return not_started(self.spec, failure, message)
        error = result[1] if isinstance(result, tuple) and len(result) == 3 else result
        return not_started(self.spec, ERROR, f"its Dask task failed: {type(error).__name__}: {error}")

    def _lost(self, result: Any) -> bool:
        """Whether the client cancelled the task because it lost its scheduler (not for a kill)."""
        return self._killed is None and getattr(result, "reason", None) == _LOST

    def kill(self, failure: FailureKind, message: str, grace: Optional[float] = None) -> bool:
        with self._lock:
            if self._ended or self._killed is not None:
                return False
            self._killed = (failure, message)
            if self.future is None:  # not handed to Dask yet (both on the loop): flush() ends it
                return True
        self.launcher.kill_later(self, failure, message, grace)
        return True

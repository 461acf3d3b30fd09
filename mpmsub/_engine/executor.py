"""MemoryAwareExecutor: a concurrent.futures.Executor that runs commands under a CPU and memory
budget.

Callers only validate and enqueue; one event-loop thread owns the queue, the ledger and the
running jobs, and is woken by submits, process exits, output and timers.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import sys
import threading
import time
import weakref
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Set,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from mpmsub._backends.base import Backend, LaunchOptions
from mpmsub._backends.base import resolve as resolve_backend
from mpmsub._backends.base import size as backend_size
from mpmsub._call import Call, CallPayload, check_callable, chunks, map_call
from mpmsub._engine.core import Core, Item, Lifecycle, RunState, Settings
from mpmsub._engine.devices import GpuDevices
from mpmsub._engine.future import JobFuture
from mpmsub._errors import CallPicklingError
from mpmsub._job import Job, Pipeline, to_spec
from mpmsub._launch.base import Launcher, PoolOptions
from mpmsub._launch.loop import EventLoop
from mpmsub._learn.runbook import RunBook
from mpmsub._policy.ledger import Ledger
from mpmsub._policy.scheduler import Scheduler, check_policy
from mpmsub._protocol import PREPARING
from mpmsub._result import KILLED, PICKLE, FailureKind, JobResult, never_ran
from mpmsub._spec import JobSpec
from mpmsub._system import detect_memory, memory_groups
from mpmsub._units import MB, MemoryLike, format_memory, parse_cpus, parse_duration, parse_memory, parse_resources

# The history, the trace and the worker pool are imported where first used: `import mpmsub`
# loads what running commands needs, and no more.
if TYPE_CHECKING:
    from mpmsub._learn.history import History, Recorder
    from mpmsub._report.trace import PathLike, Trace

logger = logging.getLogger("mpmsub")

if sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # pragma: no cover - Python 3.9
    from typing_extensions import ParamSpec

T = TypeVar("T")
P = ParamSpec("P")

# Each captured stream of a job keeps this much in this process; the rest is read and dropped,
# and the text ends with a note saying so (stdout_to / --results DIR keep a large output whole).
DEFAULT_OUTPUT_LIMIT = "64M"

_live_executors: weakref.WeakSet[MemoryAwareExecutor] = weakref.WeakSet()


@dataclass(frozen=True)
class ExecutorStatus:
    """A moment's view of an executor: jobs waiting and running, and what the running ones
    reserve: CPUs, memory, the named pools of `resources=` and GPU devices."""

    queued: int
    running: int
    reserved_cpus: int
    reserved_memory: int  # bytes
    # bytes: the running jobs' resident memory at their last sample (their whole trees); None
    # where jobs run elsewhere (a remote backend measures them there)
    memory_in_use: Optional[int] = None
    running_jobs: Tuple[str, ...] = ()  # the running jobs' ids (running() says more of each)
    # Each named pool of the executor (every one listed, 0 when none is held): what running jobs hold.
    reserved_resources: Dict[str, int] = field(default_factory=dict)
    # The GPU devices running jobs hold, by id, sorted (a device shared by several jobs once);
    # empty where a remote backend places jobs on its own devices.
    gpus_in_use: Tuple[int, ...] = ()


@dataclass(frozen=True)
class RunningJob:
    """One running job, as `MemoryAwareExecutor.running()` sees it: enough to pick one to kill."""

    job_id: str
    command: str  # the command line (a pipeline's stages joined by |; a call's function)
    start_time: float  # Unix time this run started
    runtime: float  # seconds since then
    attempt: int  # 1 for its first run, 2 for its first retry or requeue, ...
    cpus: int
    memory_reserved: int  # bytes: its m (0 without one)
    # bytes: its whole tree's resident memory at the last sample; None where it runs elsewhere
    memory_in_use: Optional[int]
    cpu_time: Optional[float]  # seconds of CPU its whole tree used so far; None where it runs elsewhere
    where: str  # this machine's name, a Dask worker's address, or "SLURM job N" (and its state)
    stopping: bool = False  # being killed by kill(), or stopped for memory
    gpus: Tuple[int, ...] = ()  # the GPU devices it holds, by id (as its CUDA_VISIBLE_DEVICES names them)
    resources: Dict[str, int] = field(default_factory=dict)  # the named resources it holds


class MemoryAwareExecutor(Executor):
    """Run commands in parallel without exceeding a CPU and memory budget.

    `cpus` and `memory` default to what this machine (or its container) offers; `memory` takes
    MB as a number or a string such as '8G'. `max_workers` caps how many jobs run at once; given
    without `cpus`, it is also the number of CPUs handed out (as ProcessPoolExecutor's workers).
    `kill_grace` is the time between SIGTERM and SIGKILL when a job is stopped.

    `schedule` picks the order of queued jobs: "fifo" (the default: priority, then submission
    order), "pack" (priority, then largest memory first) or "greedy" (fifo order, and any job
    that fits starts at once). With "fifo" and "pack" the first job that does not fit holds a
    reservation: later jobs start before it only if that cannot delay it (backfill).

    Memory is enforced while jobs run: when the running jobs together use more than `memory`, the
    one furthest over its declaration is killed and fails with a memory error; with
    `strict_memory`, any job with `m` is killed as soon as it uses more than its `m`. Jobs with
    `m` start only while the machine's available memory (or, in a container, what its memory
    limit leaves), less `memory_reserve` (default: 5% of that memory, at most 2G; 0 turns the
    gate off), can hold them, or nothing else runs; when it falls
    under the reserve, the newest job is stopped and put back at the head of the queue.

    Python functions run too, as with ProcessPoolExecutor: `submit(fn, *args, **kwargs)`,
    `map(fn, *iterables, chunksize=...)`, or `submit(Call(fn, ...).memory("2G"))` to give a call
    resources. They run in reused worker processes, one call at a time each, under the same
    ledger as commands; the workers are forked from a zygote, one fresh interpreter per executor
    that imports the main module once (workers never fork from this threaded process).
    `max_tasks_per_child`, `initializer` and `initargs` are ProcessPoolExecutor's; `mp_context`
    may be None or a "spawn" or "forkserver" context ("spawn": each worker a fresh interpreter).

    `backend` is where jobs run: "local" (this machine), `DaskBackend(address_or_client)`,
    `SlurmBackend(...)`, or an address ("dask://host:8786", "slurm://partition"); by default
    `MPMSUB_BACKEND` in the environment, else this machine. Elsewhere, `cpus` and `memory` cap
    what runs at once (by default, all the backend offers), and each job runs under mpmsub on the
    machine it lands on, measured, timed out and killed as here.

    `trace` is a file the executor writes its trace to as it runs (JSON Lines: each run's start
    and end with what it reserved and used, and the memory in use over time); `mpmsub report
    TRACE -o report.html` makes a report of it.

    `resources` names countable pools jobs hold units of (`{"licence": 2}`; `Job.resources`), and
    `gpus` the GPU devices jobs get (`Job.gpu`): None detects them (NVML or nvidia-smi) when a job
    first asks, a number or a list of ids names them; see docs/gpus.md.

    `output_limit` is how much of each job's captured stdout and of its stderr this process keeps
    (default 64M each; None keeps everything): the rest is read and dropped, and the text ends
    with a note saying so. Output held for running jobs counts against `memory`. A job's output
    sent to a file (`stdout_to`) is not captured, nor limited.
    """

    # For the package's own subclasses (not parameters, so that help() shows none of them): a
    # trace kept in memory without a file (the cluster's, for report()), and the seconds between
    # the monitor's samples once jobs are past their first second.
    _keeps_trace = False
    _monitor_interval = 0.1

    def __init__(
        self,
        cpus: Optional[int] = None,
        memory: Optional[MemoryLike] = None,
        *,
        max_workers: Optional[int] = None,
        kill_grace: float = 2.0,
        strict_memory: bool = False,
        memory_reserve: Optional[MemoryLike] = None,
        schedule: str = "fifo",
        max_tasks_per_child: Optional[int] = None,
        initializer: Optional[Callable[..., Any]] = None,
        initargs: Tuple[Any, ...] = (),
        mp_context: Any = None,
        backend: Any = None,
        history: Any = True,
        auto_memory: bool = False,
        probe_memory: Optional[MemoryLike] = None,
        trace: Optional[PathLike] = None,
        output_limit: Optional[MemoryLike] = DEFAULT_OUTPUT_LIMIT,
        resources: Optional[Mapping[str, int]] = None,
        gpus: Any = None,
    ) -> None:
        if os.environ.get(PREPARING):
            raise RuntimeError(
                "a worker process is importing the program's main module, and that module creates an "
                "executor itself (it would run its jobs again here): start the executor under "
                "`if __name__ == '__main__':`"
            )
        slots = None if max_workers is None else parse_cpus(max_workers, "max_workers")
        self.backend = resolve_backend(backend)
        self._own_backend = not isinstance(backend, Backend)  # made here from a name: closed here
        ncpus, budget = backend_size(
            self.backend,
            parse_cpus(cpus, "cpus") if cpus is not None else slots,
            None if memory is None else parse_memory(memory, "memory"),
        )
        if budget <= 0:
            raise ValueError(f"invalid memory {memory!r}: the executor needs a positive memory budget")
        kill_grace = _check_kill_grace(kill_grace)
        if not isinstance(strict_memory, bool):
            raise TypeError(f"strict_memory must be True or False; got {strict_memory!r}")
        history_path, probe = check_learning(history, auto_memory, probe_memory, budget)
        trace_path: Optional[PathLike] = None
        if trace is not None:
            from mpmsub._report.trace import check_target

            trace_path = check_target(trace)
        self.output_limit = _check_output_limit(output_limit)
        _check_pool_options(max_tasks_per_child, initializer, initargs, mp_context)
        reserve = _reserve(self.backend, memory_reserve)
        self.resources: Dict[str, int] = {} if resources is None else parse_resources(resources)
        # None: detected when a job first asks for one (a cluster's run: the cluster's devices).
        self._gpus = gpus if isinstance(gpus, GpuDevices) else GpuDevices(gpus, self.backend.local)
        self.cpus = ncpus
        self.memory = budget
        self.max_workers = slots
        self.strict_memory = strict_memory
        self.memory_reserve = reserve
        self.auto_memory = auto_memory
        self.probe_memory = probe
        self.history: Optional[History] = None
        recorder: Optional[Recorder] = None
        if history_path is not None:
            from mpmsub._learn import history as _history

            self.history = _history.shared(history_path)
            recorder = _history.Recorder(self.history)
        self._runbook = RunBook(recorder)

        self.schedule = check_policy(schedule)
        self.kill_grace = kill_grace
        # A remote backend at its whole size places jobs by each place's own resources and queues
        # the rest itself: it is handed jobs ahead (Backend.lookahead times its size). Given
        # sizes are hard caps.
        ahead = self.backend.lookahead
        ledger = Ledger(
            ncpus * ahead if cpus is None and slots is None else ncpus,
            budget * ahead if memory is None else budget,
            slots,
            self.resources,
            self._gpus.places(),
            here=self.backend.local,
        )
        trace_log: Optional[Trace] = None
        if trace_path is not None or self._keeps_trace:
            header: Dict[str, Any] = {
                "cpus": ncpus,
                "memory": budget,
                "max_workers": slots,
                "schedule": self.schedule,
                "backend": "local" if self.backend.local else repr(self.backend),
            }
            if self.resources:
                header["resources"] = dict(self.resources)
            if self._gpus.devices:  # (given, or a cluster's already detected; else a line when found)
                header["gpus"] = self._gpus.described()
            from mpmsub._report.trace import Trace

            trace_log = Trace(trace_path, header, self._monitor_interval)  # first: the one open that may fail
            self._gpus.on_found = trace_log.devices
        try:
            self._loop = EventLoop("mpmsub-executor")
            self._inbox = Inbox(self._loop, self._take_inbox)
            spawn = mp_context is not None and mp_context.get_start_method() == "spawn"
            options = PoolOptions(max_tasks_per_child, initializer, tuple(initargs), zygote=not spawn)
            self._launcher: Launcher = self.backend.launcher(
                LaunchOptions(self._loop, self.kill_grace, options, strict_memory, self.output_limit)
            )
            settings = Settings(
                memory=budget,
                cpus=ncpus,
                kill_grace=self.kill_grace,
                strict_memory=strict_memory,
                memory_reserve=reserve,
                probe_memory=probe,
                memory_groups=memory_groups(),  # a container's limit, read with the machine's figure
                close_backend=self.backend.close if self._own_backend else None,
                on_closed=lambda: _live_executors.discard(self),
                gpu_env=self._gpus.environment,
            )
            scheduler: Scheduler[Item] = Scheduler(self.schedule)
            self._core = Core(
                settings,
                self._loop,
                self._launcher,
                ledger,
                scheduler,
                trace_log,
                self._runbook,
                self._monitor_interval,
            )
            # The core holds its executor: a program that drops an executor with jobs still to
            # run (`for r in MemoryAwareExecutor().map(...)`) gets them all, and the executor is
            # shut down at exit (the finalize below holds the monitor, and through it the core).
            self._core.owner = self
            self._loop.start()
        except BaseException:
            if trace_log is not None:
                trace_log.close()
            raise
        _live_executors.add(self)
        weakref.finalize(self, _stop_loop, self._loop, self._core.monitor, self._runbook, trace_log)
        self._ref = weakref.ref(self)  # what each future holds for JobFuture.kill()

    def __repr__(self) -> str:
        cap = f", max_workers={self.max_workers}" if self.max_workers else ""
        where = "" if self.backend.local else f", backend={self.backend!r}"
        return f"MemoryAwareExecutor(cpus={self.cpus}, memory={format_memory(self.memory)!r}{cap}{where})"

    # -- the public interface (any thread) -------------------------------------------------------

    @overload
    def submit(self, fn: Union[Job, Pipeline, Dict[str, Any], List[Any]], /) -> JobFuture[JobResult]: ...

    @overload
    def submit(self, fn: Call[T], /) -> JobFuture[T]: ...

    @overload
    def submit(self, fn: JobSpec, /) -> JobFuture[Any]: ...  # a command's or a call's

    @overload
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> JobFuture[T]: ...

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> JobFuture[Any]:
        """Queue a job or a Python call; return its Future.

        A job (a Job, a job dict, a Pipeline or a list of strings) resolves to a JobResult, also
        when the command fails. `submit(fn, *args, **kwargs)` (or a `Call`) runs `fn` in a worker
        process and resolves to what it returns, or raises what it raised (with the worker's
        traceback as `__cause__`), or a CallError subclass saying why it did not finish. Bad input
        raises ValueError/TypeError here, at once, as does a job larger than the executor; a call
        that cannot be pickled fails its own future (CallPicklingError, naming what failed).
        Every future's `usage` is the measured JobResult once it is done.
        """
        if isinstance(fn, Call):
            if args or kwargs:
                raise TypeError(f"submit() takes a Call alone; give the arguments to Call(), not {args!r} {kwargs!r}")
            spec = fn.spec()
        elif callable(fn) and not isinstance(fn, (Job, Pipeline, JobSpec)):
            spec = JobSpec(stages=(), call=CallPayload(fn, args, kwargs, chunk=False))  # Call(fn).spec(), faster
        elif args or kwargs:
            raise TypeError(
                "submit() takes one job (a Job, a job dict, a Pipeline or a list of strings), "
                f"not extra arguments {args!r} {kwargs!r}"
            )
        else:
            spec = to_spec(fn)
        return self._submit(spec)

    def _submit(self, spec: JobSpec) -> JobFuture[Any]:
        if self.auto_memory and spec.memory is None and not spec.auto:
            spec = dataclasses.replace(spec, auto=True)
        key: Optional[str] = None
        size = 0
        place: Optional[int] = None
        if spec.auto or spec.gpu_auto or self._runbook.recorder is not None:  # reads the disk: not on the loop
            from mpmsub._learn.keys import key_and_input

            key, size = key_and_input(spec)
            if spec.auto or spec.gpu_auto:
                self._runbook.load(key)
                if not self._launcher.local:
                    place = self.backend.place_memory(spec.cpus)
        request = spec.request
        if spec.gpus:
            if spec.call is not None:
                raise ValueError(
                    "a call runs in a worker process that runs other calls too, and CUDA reads its visible "
                    "devices once per process: give GPUs to a command (Job), not a call"
                )
            self._gpus.ready(self._core.ledger)  # detects them: not on the loop, not under the lock
        future: JobFuture[Any] = JobFuture()
        future._executor = self._ref
        unsent: Optional[CallPicklingError] = None
        if not self._launcher.local:  # asks the backend (a Dask scheduler): not under the lock
            nowhere = self._launcher.why_never_fits(spec)
            if nowhere is not None:
                who = repr(spec.job_id) if spec.job_id is not None else spec.describe()
                raise ValueError(f"job {who} can never run on {self.backend!r}: {nowhere}")
        if spec.call is not None:
            try:
                spec.call.data()  # pickled here, once, outside the lock: what fails, fails its own future
            except CallPicklingError as exc:
                unsent = exc
        inbox = self._inbox
        with inbox.lock:
            if self._core.lifecycle is not Lifecycle.OPEN:
                raise RuntimeError("cannot submit a job after the executor has been shut down")
            job_id = inbox.claim(spec.job_id)
            why = self._core.ledger.why_never_fits(request)
            if why is not None:
                inbox.ids.discard(job_id)
                raise ValueError(f"job {job_id!r} can never run on this executor: {why}")
            if unsent is not None:
                _unsent(future, spec, job_id, unsent)
                return future
            item = inbox.put(spec, job_id, future, self.kill_grace)
            item.key, item.input_size, item.place_memory = key, size, place
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
        cpus: Optional[int] = None,
        memory: Optional[MemoryLike] = None,
    ) -> Iterator[T]:
        """`fn` over the items of `iterables`, in worker processes, as the standard library's
        `map`: results in order, `timeout` counted from this call, `chunksize` items sent to a
        worker at a time. `cpus` and `memory` are what each chunk reserves (its items run one
        after another). Every chunk is submitted now; leaving the iteration early cancels the
        chunks not yet started."""
        if isinstance(fn, (Job, Pipeline, JobSpec, Call, list, dict)):
            raise TypeError(f"map() runs a Python function over items; submit each command with submit(): got {fn!r}")
        check_callable(fn)
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"invalid chunksize {chunksize!r}: expected a whole number, at least 1")
        if timeout is not None:
            timeout = parse_duration(timeout)
        template = map_call(fn, cpus, memory)
        end = None if timeout is None else time.monotonic() + timeout
        futures = [
            self._submit(template._chunk_spec(chunk, index * chunksize))
            for index, chunk in enumerate(chunks(iterables, chunksize))
        ]
        return _results(futures, end)

    def status(self) -> ExecutorStatus:
        """Jobs queued and running now (the running ones' ids), and the CPUs, memory, named
        resources and GPU devices the running ones hold; `running()` says more of each running job."""
        # Plain reads of the loop thread's counters: each is consistent, together a moment's view.
        core = self._core
        ledger = core.ledger
        queued = len(core.scheduler) + len(self._inbox) + core.held_count
        in_use = core.in_use() if self._launcher.local else None
        items = list(core.running.values())
        return ExecutorStatus(
            queued,
            len(items),
            ledger.used_cpus,
            ledger.used_memory,
            in_use,
            tuple(item.job_id for item in items),
            {name: ledger.used[name] for name in ledger.named},
            tuple(sorted({device for item in items for device in item.devices})),
        )

    def kill(self, job: Union[JobFuture[Any], str], reason: Optional[str] = None) -> bool:
        """Kill one job: the whole process tree of a running job (a call's worker, which is
        then replaced), SIGTERM and SIGKILL after `kill_grace`; a queued job is cancelled as by
        `future.cancel()`. `job` is its future or its id. Nothing of it runs again (no retry, no
        requeue). A killed job's result has failure "killed" and the error "killed: REASON"; a
        killed call's `result()` raises CallKilledError. Returns whether it stopped the job:
        False when it had ended (or was ending on its own: it exited, or its timeout's kill was
        under way; it keeps its own result then, and is not retried) or was killed already. On
        Dask and SLURM a job that ended there a moment before may still count as stopped (its
        result, read later, says how it ended). Any thread.

        `future.cancel()` keeps concurrent.futures' meaning: it cancels a queued job and leaves
        a running one alone. `terminate()` stops every job."""
        future, job_id = self._target(job)
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"reason must be a string or None; got {reason!r}")
        message = f"killed: {reason}" if reason else "killed on request"
        return self._kill(future, job_id, KILLED, message, None)

    def _target(self, job: object) -> Tuple[Optional[JobFuture[Any]], Optional[str]]:
        """The future or id kill() is given, checked to be this executor's."""
        if isinstance(job, JobFuture):
            if job.__dict__.get("_executor") is not self._ref:
                raise ValueError(f"{job!r} is not the future of a job of this executor")
            return job, None
        if isinstance(job, str):
            with self._inbox.lock:
                if job not in self._inbox.ids:
                    raise ValueError(f"no job {job!r} was submitted to this executor")
            return None, job
        raise TypeError(f"kill() takes a job's future or its id (a string); got {job!r} ({type(job).__name__})")

    def _kill(
        self,
        future: Optional[JobFuture[Any]],
        job_id: Optional[str],
        failure: FailureKind,
        message: str,
        grace: Optional[float],
    ) -> bool:
        core = self._core
        grace = self.kill_grace if grace is None else grace
        item: Optional[Item] = None

        def kill() -> Optional[bool]:
            nonlocal item
            item = core.find(future, job_id)
            return False if item is None else core.kill(item, failure, message, grace)

        none: Optional[bool] = False
        stopped = self._on_loop(kill, none)
        if stopped is not None or item is None:
            return bool(stopped)
        # It never started: cancelled here, as cancel() does (its callbacks run on this thread),
        # then taken out of the queue. A job that started meanwhile is killed as a running one.
        queued = item
        cancelled_before = queued.future.cancelled()
        if not queued.future.cancel():
            return self._kill(future, job_id, failure, message, grace)
        return bool(self._on_loop(lambda: core.drop_killed(queued, message, not cancelled_before), False))

    def _take_back(self, future: JobFuture[Any]) -> None:
        """JobFuture.cancel() cancelled a job handed to the backend (any thread): the loop takes
        it back from there (Core.take_back), without waiting."""
        job_id = future.__dict__.get("_job_id")
        if job_id is not None and self._loop.is_alive():
            self._loop.call_soon_threadsafe(self._core.take_back, job_id)

    def _on_loop(self, function: Callable[[], T], closed: T) -> T:
        """What `function` returns, run on the loop thread (which owns the jobs); `closed` if
        the loop has stopped (every job has ended)."""
        if self._loop.in_loop_thread():
            return function()
        if not self._loop.is_alive():
            return closed
        answer: List[Any] = []
        done = threading.Event()

        def call() -> None:
            try:
                answer.append((True, function()))
            except BaseException as exc:  # raised again in the caller's thread
                answer.append((False, exc))
            finally:
                done.set()

        self._loop.call_soon_threadsafe(call)
        # A loop that stops (it had closed: nothing runs) drops the call: look at it now and then.
        while not done.wait(0.1):
            if not self._loop.is_alive():
                break
        if not answer:
            return closed
        ok, value = answer[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def running(self) -> List[RunningJob]:
        """The jobs running now, in the order they started: id, command, start, CPUs and memory
        reserved, memory in use at the last sample and CPU time so far (None where jobs run
        elsewhere), where each runs, whether it is being stopped, and the GPU devices and named
        resources it holds. Any thread."""

        def look() -> List[Tuple[Any, ...]]:
            now, wall = time.monotonic(), time.time()
            rows = []
            for item in self._core.running.values():
                run = item.run
                if run is None or run.handle is None:
                    continue
                started = wall - (now - run.started)
                stopping = item.state is RunState.STOPPING
                rows.append((item, run, run.handle, started, now - run.started, stopping, item.devices))
            return rows

        none: List[Tuple[Any, ...]] = []
        rows = self._on_loop(look, none)
        if not rows:
            return []
        local = self._launcher.local
        snapshot = None
        if local:
            from mpmsub._launch import proctree

            snapshot = proctree.snapshot()
        places = self._launcher.where([row[2] for row in rows])
        jobs = []
        for (item, run, handle, started, runtime, stopping, devices), where in zip(rows, places):
            jobs.append(
                RunningJob(
                    job_id=item.job_id,
                    command=item.spec.describe(),
                    start_time=started,
                    runtime=runtime,
                    attempt=run.number,
                    cpus=item.spec.cpus,
                    memory_reserved=item.request.memory,
                    memory_in_use=(run.rss + item.captured) if local else None,
                    cpu_time=handle.cpu_time(snapshot) if snapshot is not None else None,
                    where=where,
                    stopping=stopping,
                    gpus=devices,
                    resources=dict(item.spec.resources),
                )
            )
        return jobs

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting jobs; with `cancel_futures`, cancel the queued ones; with `wait`, return
        once every started job has finished."""
        self._shut_down(cancel_futures, None)
        if wait:
            self._wait()

    def terminate(self, reason: str = "the executor was terminated") -> None:
        """Stop now: cancel the queued jobs and kill the process trees of the running ones."""
        self._shut_down(True, reason)
        self._wait()

    def _shut_down(self, cancel_queued: bool, kill_reason: Optional[str]) -> None:
        """Take no more jobs, and tell the loop (with `kill_reason`: kill what runs)."""
        with self._inbox.lock:
            if self._core.lifecycle is Lifecycle.OPEN:
                self._core.advance(Lifecycle.SHUT_DOWN)
            if self._loop.is_alive():
                self._loop.call_soon_threadsafe(self._core.shut_down, cancel_queued, kill_reason)

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> Literal[False]:
        if exc_type is None:
            self.shutdown(wait=True)
        else:
            self.terminate(f"stopped by {exc_type.__name__} in the executor's with block")
        return False

    def _wait(self) -> None:
        if self._loop.in_loop_thread():
            return  # the loop cannot wait for itself; it finishes on its own
        try:
            self._loop.join()
        except BaseException:  # Ctrl-C while waiting: nothing of ours may outlive the wait
            self._shut_down(True, "interrupted while waiting for jobs")
            self._loop.join()
            raise
        self._core.delivery.join()  # results and cancellations handed over are all visible on return
        self._runbook.join()  # every finished run is in the history on return

    def _take_inbox(self) -> None:
        """On the loop: hand the jobs submitted since the last call to the core."""
        self._core.take(self._inbox.take())


class Inbox:
    """The jobs submitted and not yet taken by the loop, and the job ids in use. Submitters hold
    `lock` while they claim an id and put a job in; the first job put into an empty inbox posts
    one call to the loop, which takes the whole inbox."""

    def __init__(self, loop: EventLoop, on_first: Callable[[], None]) -> None:
        self.lock = threading.Lock()  # also guards the executor's move to SHUT_DOWN
        self.ids: Set[str] = set()
        self._items: List[Item] = []
        self._posted = False
        self._seq = itertools.count()
        self._auto_id = itertools.count(1)
        self._loop = loop
        self._on_first = on_first

    def __len__(self) -> int:
        return len(self._items)

    def claim(self, wanted: Optional[str]) -> str:
        """The job's id: the one it asks for, unless taken, or the next free job_NNNN (under `lock`)."""
        if wanted is not None:
            if wanted in self.ids:
                raise ValueError(f"duplicate job id {wanted!r}: ids must be unique within an executor")
            self.ids.add(wanted)
            return wanted
        while True:
            job_id = f"job_{next(self._auto_id):04d}"
            if job_id not in self.ids:
                self.ids.add(job_id)
                return job_id

    def forget(self, job_id: str) -> None:
        """Let a finished job's id be used again (for an executor that runs jobs for others)."""
        with self.lock:
            self.ids.discard(job_id)

    def put(self, spec: JobSpec, job_id: str, future: JobFuture[Any], grace: float) -> Item:
        """A job in the inbox (under `lock`): one call to the loop for a burst of submits."""
        item = Item(next(self._seq), spec, job_id, future, grace)
        self._items.append(item)
        if not self._posted:
            self._loop.call_soon_threadsafe(self._on_first)
            self._posted = True
        return item

    def take(self) -> List[Item]:
        """On the loop: every job put in since the last take."""
        with self.lock:
            items, self._items = self._items, []
            self._posted = False
        return items


def _check_kill_grace(kill_grace: object) -> float:
    """The seconds between SIGTERM and SIGKILL: a number, 0 or more (inf would never SIGKILL)."""
    if isinstance(kill_grace, bool) or not isinstance(kill_grace, (int, float)):
        raise ValueError(f"invalid kill_grace {kill_grace!r}: expected a number of seconds, 0 or more")
    return float(parse_duration(kill_grace, "kill_grace", zero=True))


def _check_output_limit(output_limit: Optional[MemoryLike]) -> Optional[int]:
    """Bytes of each captured stream kept per job (None: all)."""
    limit = None if output_limit is None else parse_memory(output_limit, "output_limit")
    if limit == 0:
        raise ValueError(f"invalid output_limit {output_limit!r}: expected a size above 0, or None to keep all")
    return limit


def _reserve(backend: Backend, memory_reserve: Optional[MemoryLike]) -> int:
    """The memory the live gate keeps free on this machine (0: no gate)."""
    if not backend.local:
        # The gate and the reserve watch this machine's memory; the jobs run elsewhere, each
        # under mpmsub there, which watches its own.
        if memory_reserve is not None and parse_memory(memory_reserve, "memory_reserve"):
            raise ValueError(
                f"memory_reserve={memory_reserve!r} applies to local runs only; with the backend "
                f"{backend!r} each machine's mpmsub keeps its own reserve"
            )
        return 0
    if memory_reserve is None:
        return min(2 * 1024 * MB, int(0.05 * detect_memory()))
    return parse_memory(memory_reserve, "memory_reserve")


def check_learning(
    history: Any, auto_memory: object, probe_memory: Optional[MemoryLike], budget: int
) -> Tuple[Optional[str], Optional[int]]:
    """The history's path (None: off) and the probes' reservation (None: what is free)."""
    if not isinstance(auto_memory, bool):
        raise TypeError(f"auto_memory must be True or False; got {auto_memory!r}")
    probe = None if probe_memory is None else parse_memory(probe_memory, "probe_memory")
    if probe is not None and not 0 < probe <= budget:
        raise ValueError(
            f"invalid probe_memory {probe_memory!r}: expected a size above 0 and within the "
            f"{format_memory(budget)} budget (None: what is free when the probe starts)"
        )
    if history is False:
        return None, probe
    from mpmsub._learn.history import resolve

    return resolve(history), probe


def _check_pool_options(
    max_tasks_per_child: Optional[int], initializer: Optional[Callable[..., Any]], initargs: Any, mp_context: Any
) -> None:
    """ProcessPoolExecutor's options, validated as it does (and the start method we honour)."""
    if max_tasks_per_child is not None:
        if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
            raise TypeError(f"max_tasks_per_child must be a whole number or None; got {max_tasks_per_child!r}")
        if max_tasks_per_child < 1:
            raise ValueError(f"invalid max_tasks_per_child {max_tasks_per_child!r}: expected 1 or more")
    if initializer is not None:
        check_callable(initializer)
    if not isinstance(initargs, tuple):
        raise TypeError(f"initargs must be a tuple; got {initargs!r}")
    if mp_context is not None:
        method = getattr(mp_context, "get_start_method", lambda: None)()
        if method not in ("spawn", "forkserver"):
            raise ValueError(
                f"invalid mp_context {mp_context!r} (start method {method!r}): mpmsub's workers are never "
                "forked from this threaded process (they are forked from a zygote, a fresh interpreter); "
                "give None, or a 'spawn' or 'forkserver' context"
            )


def _unsent(future: JobFuture[Any], spec: JobSpec, job_id: str, exc: CallPicklingError) -> None:
    """Fail the future of a call that could not be pickled, with a result saying so."""
    result = never_ran(spec, job_id, PICKLE, str(exc), attempts=0, exception=exc)
    exc.result = result
    future.usage = result
    future.set_exception(exc)


def _results(futures: List[JobFuture[Any]], end: Optional[float]) -> Iterator[Any]:
    """map()'s results, chunk by chunk, in order; the chunks not reached are cancelled if the
    iteration stops early (an exception, a timeout, or the generator closed)."""
    try:
        futures.reverse()  # pop() from the end: each future is dropped once its results are out
        while futures:
            future = futures.pop()
            if end is None:
                yield from future.result()
            else:
                yield from future.result(end - time.monotonic())
    finally:
        for future in futures:
            future.cancel()


def _stop_loop(loop: EventLoop, monitor: Any, runbook: RunBook, trace: Optional[Trace]) -> None:
    monitor.close()
    if trace is not None:
        trace.close()
    loop.call_soon_threadsafe(loop.stop)
    runbook.close()


def _at_exit() -> None:
    """At interpreter exit: finish the work of executors never shut down, or kill it if the
    program is dying of an exception (such as Ctrl-C)."""
    dying = getattr(sys, "last_value", None) is not None
    while True:
        try:
            executors = list(_live_executors)
            break
        except RuntimeError:  # the set changed while it was copied: an executor closed
            continue
    for executor in executors:
        if dying:
            executor.terminate("the program is exiting on an uncaught exception")
        else:
            executor.shutdown(wait=True)
    history = sys.modules.get("mpmsub._learn.history")  # none to close where it was never imported
    if history is not None:
        history.close_recorders()  # the rows of executors shut down without waiting


try:
    threading._register_atexit(_at_exit)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - Python without the hook
    import atexit

    atexit.register(_at_exit)

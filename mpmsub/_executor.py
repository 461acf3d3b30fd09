"""MemoryAwareExecutor: a concurrent.futures.Executor that runs commands under a CPU and memory
budget.

Callers only validate and enqueue; one event-loop thread owns the queue, the ledger and the
running jobs, and is woken by submits, process exits, output and timers.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Literal,
    Optional,
    Set,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from mpmsub import _errors, _proctree
from mpmsub import _result as kinds
from mpmsub._backends import Backend, LaunchOptions
from mpmsub._backends import resolve as resolve_backend
from mpmsub._backends import size as backend_size
from mpmsub._call import Call, CallPayload, check_callable, chunks, map_call
from mpmsub._delivery import Delivery
from mpmsub._enforce import Usage, budget_stops, newest, strict_overuse, strict_stops
from mpmsub._errors import (
    CallCancelledError,
    CallError,
    CallPicklingError,
    CallTimeoutError,
    MemoryLimitError,
)
from mpmsub._future import JobFuture
from mpmsub._job import Job, JobSpec, Pipeline, to_spec
from mpmsub._launcher import Handle, Launcher, Outcome, not_started
from mpmsub._ledger import Ledger, Request
from mpmsub._loop import EventLoop
from mpmsub._monitor import Monitor
from mpmsub._result import JobResult
from mpmsub._scheduler import Scheduler, check_policy
from mpmsub._system import available_memory, detect_memory, memory_groups
from mpmsub._units import MB, MemoryLike, format_memory, parse_cpus, parse_duration, parse_memory

# The history, m="auto"'s learning, the trace and the worker pool are imported where first used:
# `import mpmsub` loads what running commands needs, and no more.
if TYPE_CHECKING:
    from mpmsub._history import History, Recorder
    from mpmsub._learn import Estimate, Run
    from mpmsub._trace import PathLike, Trace

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
_GATE_RETRY = 0.5  # seconds between looks at the machine's free memory while a job waits for it
_MAX_REQUEUES = 3  # stops for the machine's sake before a job fails with a memory error
_AUTO_RETRIES = 5  # m="auto": runs again with more memory after a memory stop, up to the budget
_PREPARING = "_MPMSUB_WORKER_PREPARING"  # _worker.PREPARING (not imported here: the engine does without it)
_GATHER = 0.05  # seconds between the first job of a key never seen and the choice of its probe
# How long the kernel's count of available memory may take to show an allocation (measured: up
# to about a second; its per-CPU counters are folded into it once a second).
_AVAILABLE_LAG = 1.5
_NO_SAMPLES: Deque[Tuple[float, int]] = deque(maxlen=0)  # shared while a job waits: made per run

_live_executors: weakref.WeakSet[MemoryAwareExecutor] = weakref.WeakSet()


@dataclass(frozen=True)
class ExecutorStatus:
    """A moment's view of an executor: jobs waiting and running, and what the running ones reserve."""

    queued: int
    running: int
    reserved_cpus: int
    reserved_memory: int  # bytes
    # bytes: the running jobs' resident memory at their last sample (their whole trees); None
    # where jobs run elsewhere (a remote backend measures them there)
    memory_in_use: Optional[int] = None


class _Item:
    """A submitted job on its way through the executor."""

    __slots__ = (
        "attempts",
        "auto",
        "auto_retries",
        "bound",
        "estimate",
        "future",
        "grab",
        "handle",
        "input_size",
        "job_id",
        "key",
        "last_result",
        "last_rss",
        "oom_baseline",
        "place_memory",
        "probe",
        "requeue",
        "requeue_need",
        "requeued",
        "retries_left",
        "rss_floor",
        "rss_window",
        "runs",
        "seq",
        "shortage_final",
        "spec",
        "started",
        "stopping",
        "submitted",
    )

    def __init__(self, seq: int, spec: JobSpec, job_id: str, future: JobFuture[Any], grace: float) -> None:
        self.seq = seq
        self.spec = spec
        # The longest a run can last: its timeout, then the kill's grace and a margin to reap it.
        self.bound = None if spec.timeout is None else spec.timeout + grace + 1.0
        self.job_id = job_id
        self.future = future
        self.handle: Optional[Handle] = None
        self.attempts = 0
        self.retries_left = spec.retries
        self.requeued = 0
        self.started = 0.0  # monotonic
        self.submitted = time.monotonic()
        self.last_rss = 0  # written by the monitor thread
        # The least it used over the last _AVAILABLE_LAG seconds (0 while younger than that): what
        # the kernel's count of available memory is sure to show (written by the monitor thread).
        self.rss_floor = 0
        self.rss_window: Deque[Tuple[float, int]] = _NO_SAMPLES  # the monitor thread's; one per run
        self.stopping = False  # a stop for memory is on its way (set by the monitor thread)
        self.requeue = False  # put it back in the queue when it has stopped
        self.oom_baseline: Optional[int] = None
        self.requeue_need = 0  # bytes: the largest peak of its runs stopped for the machine's sake, + margin
        self.runs = 0  # runs started; identifies the current run to stops and exits
        self.shortage_final = False  # stopped for the machine's sake once too often
        self.last_result: Optional[JobResult] = None
        # The run history (m="auto"): its key and input size (None: no history, no auto), whether
        # its memory is predicted, from what, and whether it is the probe of its key.
        self.key: Optional[str] = None
        self.input_size = 0
        self.auto = spec.auto
        self.auto_retries = 0
        self.estimate: Optional[Estimate] = None
        self.probe = False
        self.grab = False  # a probe that takes what is free when it starts
        self.place_memory: Optional[int] = None  # the most one place of a remote backend offers

    @property
    def request(self) -> Request:
        return self.spec.request

    @property
    def priority(self) -> int:
        return self.spec.priority

    @property
    def ends_by(self) -> Optional[float]:
        """The latest (monotonic) time the current run can end; None without a timeout."""
        return None if self.bound is None else self.started + self.bound


def make_result(item: _Item, outcome: Outcome) -> JobResult:
    """Turn what a launcher measured into the JobResult users see, with the failure explained."""
    spec = item.spec
    codes = outcome.returncodes
    nonzero = [(i, rc) for i, rc in enumerate(codes) if rc not in (0, None)]
    returncode = nonzero[-1][1] if nonzero else (codes[-1] if codes else None)
    failure, error = outcome.failure, outcome.error
    if failure is None and nonzero:
        index, rc = nonzero[-1]
        where = f" (pipeline stage {index + 1}: {spec.stages[index][0]!r})" if spec.is_pipeline else ""
        who = "its worker process was " if spec.call is not None else ""
        if rc is not None and rc < 0:
            failure, error = kinds.SIGNAL, f"{who}killed by signal {_signal_name(-rc)}{where}"
        else:
            who = "its worker process " if spec.call is not None else ""
            failure, error = kinds.EXIT, f"{who}exited with status {rc}{where}"
    elif failure is None and spec.call is not None and codes and codes[-1] == 0:
        failure, error = kinds.EXIT, "its worker process exited (status 0) during the call"
    return JobResult(
        job_id=item.job_id,
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
        attempts=item.attempts,
        requeued=item.requeued,
        memory_series=[(round(t, 3), round(b / MB, 1)) for t, b in outcome.memory_series],
        value=outcome.value,
        exception=outcome.exception,
        memory_estimate=None if item.estimate is None else item.estimate.method,
        memory_estimate_runs=0 if item.estimate is None else item.estimate.runs,
    )


# The exception a call's future fails with, by failure kind (RAISED re-raises the call's own).
_CALL_ERRORS = {
    kinds.MEMORY: MemoryLimitError,
    kinds.TIMEOUT: CallTimeoutError,
    kinds.CANCELLED: CallCancelledError,
    kinds.PICKLE: CallPicklingError,
}


def call_exception(result: JobResult) -> BaseException:
    """What `result()` raises for a Python call that did not return."""
    if result.failure == kinds.RAISED and result.exception is not None:
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
    ) -> None:
        if os.environ.get(_PREPARING):
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
        if isinstance(kill_grace, bool) or not isinstance(kill_grace, (int, float)):
            raise ValueError(f"invalid kill_grace {kill_grace!r}: expected a number of seconds, 0 or more")
        kill_grace = parse_duration(kill_grace, "kill_grace", zero=True)  # inf would never SIGKILL
        if not isinstance(strict_memory, bool):
            raise TypeError(f"strict_memory must be True or False; got {strict_memory!r}")
        history_path, probe = self._check_learning(history, auto_memory, probe_memory, budget)
        trace_path: Optional[PathLike] = None
        if trace is not None:
            from mpmsub._trace import check_target

            trace_path = check_target(trace)
        self.output_limit = None if output_limit is None else parse_memory(output_limit, "output_limit")
        if self.output_limit == 0:
            raise ValueError(f"invalid output_limit {output_limit!r}: expected a size above 0, or None to keep all")
        _check_pool_options(max_tasks_per_child, initializer, initargs, mp_context)
        if not self.backend.local:
            # The gate and the reserve watch this machine's memory; the jobs run elsewhere, each
            # under mpmsub there, which watches its own.
            if memory_reserve is not None and parse_memory(memory_reserve, "memory_reserve"):
                raise ValueError(
                    f"memory_reserve={memory_reserve!r} applies to local runs only; with the backend "
                    f"{self.backend!r} each machine's mpmsub keeps its own reserve"
                )
            reserve = 0
        elif memory_reserve is None:
            reserve = min(2 * 1024 * MB, int(0.05 * detect_memory()))
        else:
            reserve = parse_memory(memory_reserve, "memory_reserve")
        self.cpus = ncpus
        self.memory = budget
        self.max_workers = slots
        self.strict_memory = strict_memory
        self.memory_reserve = reserve
        self.auto_memory = auto_memory
        self.probe_memory = probe
        self.history: Optional[History] = None
        self._recorder: Optional[Recorder] = None
        if history_path is not None:
            from mpmsub import _history

            self.history = _history.shared(history_path)
            self._recorder = _history.Recorder(self.history)
        # m="auto" (the loop's but for _learned, which submitters fill under _learn_lock): the
        # runs of each key seen so far, the probe in flight of each key never seen, and the jobs
        # of that key held until it ends.
        self._learned: Dict[str, List[Run]] = {}
        self._loaded: Set[str] = set()  # keys whose runs were read from the history
        self._learn_lock = threading.Lock()
        self._probes: Dict[str, _Item] = {}
        self._held: Dict[str, List[_Item]] = {}
        self._held_count = 0
        self._gathering: Set[str] = set()  # keys whose probe is about to be chosen
        self._memory_groups = memory_groups()  # a container's limit, read with the machine's figure
        self._terminating = False
        self._gate_room: Optional[int] = None  # free memory above the reserve, this dispatch round
        self._gate_timer = False
        self._gate_warned: Set[int] = set()
        self._gate_admitted = 0

        self.schedule = check_policy(schedule)
        self.kill_grace = float(kill_grace)
        # A remote backend at its whole size places jobs by each place's own resources and queues
        # the rest itself: it is handed jobs ahead (Backend.lookahead times its size). Given
        # sizes are hard caps.
        ahead = self.backend.lookahead
        self._ledger = Ledger(
            ncpus * ahead if cpus is None and slots is None else ncpus,
            budget * ahead if memory is None else budget,
            slots,
        )
        self._scheduler: Scheduler[_Item] = Scheduler(self.schedule)
        self._inbox: List[_Item] = []  # submitted, not yet queued by the loop (guarded by _lock)
        self._inbox_pending = False
        self._running: Dict[int, _Item] = {}
        self._lock = threading.Lock()
        self._ids: Set[str] = set()
        self._seq = itertools.count()
        self._auto_id = itertools.count(1)
        self._shutdown = False
        self._closing = False
        self._closed = False
        self._delivery = Delivery()
        self._oom_kills = _proctree.oom_kill_count()
        self._trace: Optional[Trace] = None
        if trace_path is not None or self._keeps_trace:
            header = {
                "cpus": ncpus,
                "memory": budget,
                "max_workers": slots,
                "schedule": self.schedule,
                "backend": "local" if self.backend.local else repr(self.backend),
            }
            from mpmsub._trace import Trace

            self._trace = Trace(trace_path, header, self._monitor_interval)  # first: the one open that may fail
        try:
            self._loop = EventLoop("mpmsub-executor")
            from mpmsub._workers import PoolOptions

            spawn = mp_context is not None and mp_context.get_start_method() == "spawn"
            options = PoolOptions(max_tasks_per_child, initializer, tuple(initargs), zygote=not spawn)
            self._launcher: Launcher = self.backend.launcher(
                LaunchOptions(self._loop, self.kill_grace, options, strict_memory, self.output_limit)
            )
            self._monitor = Monitor(self._monitor_interval, self._check_memory, self._launcher.housekeeping)
            self._loop.start()
        except BaseException:
            if self._trace is not None:
                self._trace.close()
            raise
        _live_executors.add(self)
        weakref.finalize(self, _stop_loop, self._loop, self._monitor, self._recorder, self._trace)

    @staticmethod
    def _check_learning(
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
        from mpmsub._history import resolve

        return resolve(history), probe

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
        if spec.auto or self._recorder is not None:  # reads the disk: here, not on the loop
            from mpmsub._learn import key_and_input

            key, size = key_and_input(spec)
            if spec.auto:
                self._load_runs(key)
                if not self._launcher.local:
                    place = self.backend.place_memory(spec.cpus)
        request = spec.request
        future: JobFuture[Any] = JobFuture()
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
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit a job after the executor has been shut down")
            job_id = self._claim_id(spec.job_id)
            why = self._ledger.why_never_fits(request)
            if why is not None:
                self._ids.discard(job_id)
                raise ValueError(f"job {job_id!r} can never run on this executor: {why}")
            if unsent is not None:
                _unsent(future, spec, job_id, unsent)
                return future
            item = _Item(next(self._seq), spec, job_id, future, self.kill_grace)
            item.key, item.input_size, item.place_memory = key, size, place
            self._inbox.append(item)
            if not self._inbox_pending:  # one call to the loop for a burst of submits
                self._loop.call_soon_threadsafe(self._take_inbox)
                self._inbox_pending = True
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
        """Jobs queued and running now, and the CPUs and memory the running ones reserve."""
        # Plain reads of the loop thread's counters: each is consistent, together a moment's view.
        queued = len(self._scheduler) + len(self._inbox) + self._held_count
        running = list(self._running.values())
        in_use = sum(item.last_rss + _captured(item) for item in running) if self._launcher.local else None
        return ExecutorStatus(queued, len(self._running), self._ledger.used_cpus, self._ledger.used_memory, in_use)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting jobs; with `cancel_futures`, cancel the queued ones; with `wait`, return
        once every started job has finished."""
        with self._lock:
            self._shutdown = True
            if self._loop.is_alive():
                self._loop.call_soon_threadsafe(self._on_shutdown, cancel_futures, None)
        if wait:
            self._wait()

    def terminate(self, reason: str = "the executor was terminated") -> None:
        """Stop now: cancel the queued jobs and kill the process trees of the running ones."""
        with self._lock:
            self._shutdown = True
            if self._loop.is_alive():
                self._loop.call_soon_threadsafe(self._on_shutdown, True, reason)
        self._wait()

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
            with self._lock:
                self._shutdown = True
                if self._loop.is_alive():
                    self._loop.call_soon_threadsafe(self._on_shutdown, True, "interrupted while waiting for jobs")
            self._loop.join()
            raise
        self._delivery.join()  # results and cancellations handed over are all visible on return
        if self._recorder is not None:
            self._recorder.join()  # every finished run is in the history on return

    def _load_runs(self, key: str) -> None:
        """Read the past runs of `key` from the history, once per executor (this executor's own
        runs written first, so that each is counted once)."""
        with self._learn_lock:
            if key in self._loaded or self._recorder is None:
                return
            self._loaded.add(key)
            known = len(self._learned.get(key, ()))
        self._recorder.flush()  # the rows of those `known` runs, and of any before them
        runs = self._recorder.history.runs(key)
        with self._learn_lock:
            self._learned[key] = runs + self._learned.get(key, [])[known:]

    def _forget_id(self, job_id: str) -> None:
        """Let a finished job's id be used again (for an executor that runs jobs for others)."""
        with self._lock:
            self._ids.discard(job_id)

    def _claim_id(self, wanted: Optional[str]) -> str:
        if wanted is not None:
            if wanted in self._ids:
                raise ValueError(f"duplicate job id {wanted!r}: ids must be unique within an executor")
            self._ids.add(wanted)
            return wanted
        while True:
            job_id = f"job_{next(self._auto_id):04d}"
            if job_id not in self._ids:
                self._ids.add(job_id)
                return job_id

    # -- on the loop thread ----------------------------------------------------------------------

    def _take_inbox(self) -> None:
        with self._lock:
            items, self._inbox = self._inbox, []
            self._inbox_pending = False
        auto = []
        for item in items:
            if item.auto:
                auto.append(item)
            else:
                self._scheduler.push(item)
        if auto:
            self._place_auto(auto)
        self._dispatch()

    # -- m="auto" ----------------------------------------------------------------------------------

    def _place_auto(self, items: List[_Item]) -> None:
        """Queue m="auto" jobs: with their estimate where their key has runs; else held, and one
        of them (the one with the most input) probes the key (_launch_probe)."""
        from mpmsub._learn import estimate

        for item in items:
            key = item.key or ""
            with self._learn_lock:
                runs = list(self._learned.get(key, ()))
            guess = estimate(runs, item.input_size)
            if guess is not None:
                memory = min(guess.memory, self._most(item))
                item.spec = dataclasses.replace(item.spec, memory=memory, auto=False)
                item.estimate = guess
                self._scheduler.push(item)
            else:
                self._held.setdefault(key, []).append(item)
                self._held_count += 1
                if key not in self._probes and key not in self._gathering:
                    # The probe is chosen in a moment: the rest of a batch being submitted is
                    # then here, and the job with the most input can be the one measured.
                    self._gathering.add(key)
                    self._loop.call_later(_GATHER, self._launch_probe, key)

    def _launch_probe(self, key: str) -> None:
        """Queue the probe of a key never seen: of its held jobs, the one with the most input."""
        self._gathering.discard(key)
        group = self._held.get(key)
        if not group or key in self._probes:
            return
        live = []
        for item in group:
            if _cancelled(item):  # cancelled while held: let go of it now (wakes its waiters)
                item.future.set_running_or_notify_cancel()
                self._trace_cancel(item, "cancelled before it started")
                self._held_count -= 1
            else:
                live.append(item)
        if not live:
            del self._held[key]
            self._maybe_close()
            return
        probe = max(live, key=lambda i: (i.input_size, -i.seq))
        live.remove(probe)
        self._held[key] = live
        self._held_count -= 1
        self._probes[key] = probe
        probe.probe = True
        if self.probe_memory is not None:
            memory = self.probe_memory
        else:
            # It waits for at least its CPUs' share of the budget (never starting with nothing
            # when another probe took all), then takes what is free (_start).
            memory = self.memory * probe.spec.cpus // self.cpus
            probe.grab = True
        memory = min(memory, self._most(probe))
        probe.spec = dataclasses.replace(probe.spec, memory=memory, auto=False)
        from mpmsub._learn import Estimate

        probe.estimate = Estimate(memory, "probe", 0)
        self._scheduler.push(probe)
        self._dispatch()

    def _most(self, item: _Item) -> int:
        """The most memory the job can be given: the budget, or less where one place of a remote
        backend offers less."""
        return min(self.memory, item.place_memory or self.memory)

    def _probe_ended(self, item: _Item) -> None:
        """A probe's final end (or its cancel): its siblings are estimated, or one is the next probe."""
        item.probe = False
        key = item.key or ""
        if self._probes.get(key) is item:
            del self._probes[key]
        held = self._held.pop(key, [])
        self._held_count -= len(held)
        if held:
            self._place_auto(held)

    def _learn(self, item: _Item, result: JobResult) -> None:
        """Record a run in the history, and in what this executor estimates from."""
        if item.key is None or result.failure in (kinds.START, kinds.PICKLE, kinds.ERROR):
            return  # never ran, or mpmsub failed: nothing of the tool was measured
        from mpmsub import _history, _learn

        failure = "requeued" if item.requeue else result.failure
        peak = int(result.memory_used * MB)
        if self._recorder is not None:  # before the run is counted below (see _load_runs)
            spec = item.spec
            self._recorder.put(
                _history.row(
                    item.key,
                    spec.cmd,
                    item.input_size,
                    peak,
                    result.runtime,
                    result.cpu_used,
                    result.returncode,
                    failure,
                    spec.memory,
                )
            )
        if failure in _learn.LEARNED_FROM:
            with self._learn_lock:
                runs = self._learned.setdefault(item.key, [])
                runs.append(_learn.Run(item.input_size, peak))
                if len(runs) > 4 * _learn.WINDOW:  # an estimate looks at the last WINDOW
                    del runs[: -2 * _learn.WINDOW]

    def _dispatch(self) -> None:
        self._gate_room = None
        self._gate_admitted = 0  # jobs the gate let through in this round (not yet running)
        try:
            while True:
                chosen, cancelled = self._scheduler.select(
                    self._ledger, self._running.values(), time.monotonic(), self._gate, _cancelled
                )
                for item in cancelled:
                    item.future.set_running_or_notify_cancel()  # wakes wait() and as_completed()
                    self._trace_cancel(item, "cancelled before it started")
                    if item.probe:
                        self._probe_ended(item)
                if not chosen:
                    return
                for item in chosen:
                    # A retried or requeued job's future is running already.
                    if item.future.running() or item.future.set_running_or_notify_cancel():
                        self._start(item)
                    else:  # cancelled since it was chosen
                        self._ledger.release(item.request)
                        self._trace_cancel(item, "cancelled before it started")
                        if item.probe:
                            self._probe_ended(item)
        finally:
            if self._gate_room is not None and self._scheduler and not self._gate_timer:
                # The machine's free memory changes without an event to wait on: look again soon.
                self._gate_timer = True
                self._loop.call_later(_GATE_RETRY, self._gate_retry)

    def _gate_retry(self) -> None:
        self._gate_timer = False
        self._dispatch()
        self._maybe_close()  # the round may have dropped the last (cancelled) jobs

    def _gate(self, item: _Item) -> bool:
        """The live memory gate: the machine's available memory, less the reserve and what running
        jobs have reserved (or were seen to need) but not yet touched, must hold the job."""
        need = _need(item)
        if not need or not self.memory_reserve:
            return True
        if self._gate_room is None:
            unrealized = sum(max(0, _need(i) - i.rss_floor) for i in self._running.values())
            self._gate_room = available_memory(self._memory_groups) - self.memory_reserve - unrealized
        # With nothing of ours running (or admitted in this round) a job may always start: waiting
        # could last forever (for memory the machine never has free), and if the machine then runs
        # short, the job is stopped and requeued, and fails after a few tries.
        alone = not self._running and not self._gate_admitted
        if need <= self._gate_room or alone:
            self._gate_room -= need
            self._gate_admitted += 1
            return True
        if item.seq not in self._gate_warned:
            self._gate_warned.add(item.seq)
            logger.warning(
                "mpmsub: job %s waits for memory: it needs %s, the machine has %s available above the %s reserve",
                item.job_id,
                format_memory(need),
                format_memory(max(0, self._gate_room)),
                format_memory(self.memory_reserve),
            )
        return False

    def _start(self, item: _Item) -> None:
        if item.grab:  # a probe: what is free joins its share (_launch_probe)
            item.grab = False
            old = item.request
            grab = min(old.memory + self._ledger.free_memory, self._most(item))
            item.spec = dataclasses.replace(item.spec, memory=grab)
            self._ledger.release(old)
            self._ledger.reserve(item.request)
        if not self._running:  # the monitor's count may be stale after an idle spell
            self._oom_kills = _proctree.oom_kill_count()
        self._running[item.seq] = item
        self._gate_warned.discard(item.seq)
        item.runs += 1
        item.attempts += 1
        item.started = time.monotonic()
        item.last_rss = item.rss_floor = 0
        item.rss_window = deque()
        item.stopping = item.requeue = item.shortage_final = False
        item.oom_baseline = self._oom_kills if self._launcher.local else None
        run = item.runs
        if self._trace is not None:
            spec = item.spec
            self._trace.started(item.job_id, run, spec.cpus, spec.memory, spec.describe(), item.submitted)
        logger.debug("mpmsub: start %s (%s): %s", item.job_id, item.spec.resources(), item.spec.describe())

        def on_exit(outcome: Outcome) -> None:
            self._loop.call_soon_threadsafe(self._on_exit, item, run, outcome)

        try:
            item.handle = self._launcher.start(item.spec, item.job_id, on_exit)
        except Exception as exc:  # a launcher bug or a backend failure: record it on the job
            logger.exception("mpmsub: could not start job %s", item.job_id)
            on_exit(not_started(item.spec, kinds.ERROR, f"mpmsub could not start the job: {exc!r}"))
            return
        if self._launcher.local:
            self._monitor.watch(item.handle, (item, run))

    def _on_exit(self, item: _Item, run: int, outcome: Outcome) -> None:
        if item.runs != run or self._running.pop(item.seq, None) is None:
            return  # the end of an earlier run of a job started again
        self._ledger.release(item.request)
        if item.handle is not None:
            self._monitor.unwatch(item.handle)
        self._classify_oom(item, outcome)
        self._check_final_peak(item, outcome)
        result = make_result(item, outcome)
        item.last_result = result
        self._learn(item, result)
        again = self._again(item, result)
        if self._trace is not None:
            status = "requeued" if item.requeue and again else result.failure or "ok"
            self._trace.ended(item.job_id, run, status, not again, result)
        if again:
            self._dispatch()
            self._trace_idle()
            return
        if item.probe:
            self._probe_ended(item)
        self._dispatch()  # start the next jobs before running the user's callbacks
        self._trace_idle()
        logger.debug("mpmsub: end %s: %s", item.job_id, result.error or "ok")
        self._resolve(item, result)
        self._maybe_close()

    def _trace_idle(self) -> None:
        """Nothing runs now: the trace writes what waits (see Trace.idle)."""
        if self._trace is not None and not self._running:
            self._trace.idle()

    def _trace_cancel(self, item: _Item, error: str) -> None:
        """A job cancelled before its next run began: the trace's last word on it."""
        if self._trace is not None:
            self._trace.cancelled(item.job_id, item.runs + 1, error)

    def _resolve(self, item: _Item, result: JobResult) -> None:
        """Hand a job's final result to its future: the JobResult for a command; for a call,
        what it returned, or an exception."""
        future = item.future
        future.usage = result
        if item.spec.call is None:
            self._delivery.set_result(future, result)
        elif result.success:
            self._delivery.set_result(future, result.value)
        else:
            self._delivery.set_exception(future, call_exception(result))

    def _again(self, item: _Item, result: JobResult) -> bool:
        """Requeue or retry a job that ended; False when its result is final."""
        if self._terminating or item.shortage_final:
            return False
        if item.requeue:
            item.requeued += 1
            # It was perhaps still growing: its next run waits for room for its peak plus the share
            # profile() adds to a finished job's peak, though not for more than it may be given.
            peak = int(result.memory_used * MB)
            from mpmsub._report import PROFILE_BUFFER

            margin = min(math.ceil(peak * (1 + PROFILE_BUFFER)), self._most(item))
            item.requeue_need = max(item.requeue_need, peak, margin)
            item.attempts -= 1  # a stop for the machine's sake is not the job's failure
            logger.info("mpmsub: %s requeued: %s", item.job_id, result.error)
            self._scheduler.push_front(item)
            return True
        if result.success or result.failure in (kinds.START, kinds.CANCELLED, kinds.PICKLE):
            return False
        # A predicted m that proved too little runs again with more, beyond the job's own retries.
        learning = (
            item.auto
            and result.failure == kinds.MEMORY
            and item.auto_retries < _AUTO_RETRIES
            and (item.spec.memory or 0) < self._most(item)
        )
        if learning:
            item.auto_retries += 1
        elif item.retries_left > 0:
            item.retries_left -= 1
        else:
            return False
        if result.failure == kinds.MEMORY:
            spec = item.spec
            base = spec.memory if spec.memory is not None else int(result.memory_used * MB)
            if item.auto:
                base = max(base, int(result.memory_used * MB))
            grown = min(self._most(item), max(base + MB, math.ceil(base * spec.memory_growth)))
            bigger = dataclasses.replace(spec, memory=grown)
            if not self._launcher.local and self._launcher.why_never_fits(bigger) is not None:
                return False  # no single worker or node can hold more: the backend would wait forever
            item.spec = bigger
        logger.info("mpmsub: %s failed (%s); retrying with %s", item.job_id, result.error, item.spec.resources())
        self._scheduler.push_front(item)
        return True

    def _classify_oom(self, item: _Item, outcome: Outcome) -> None:
        """A job that failed after the kernel's OOM killer killed one of its processes (known
        exactly where the job had a memory cgroup), or a SIGKILL (or a shell's 137) we did not
        send while the OOM killer struck somewhere on the machine, is a memory failure."""
        if outcome.failure is not None or all(rc == 0 for rc in outcome.returncodes):
            return
        if outcome.oom_kills:
            outcome.failure = kinds.MEMORY
            used = format_memory(outcome.peak_memory)
            if any(rc in (-9, 137) for rc in outcome.returncodes):
                outcome.error = f"killed by the kernel's out-of-memory killer (SIGKILL) after using {used}"
            else:
                outcome.error = (
                    f"failed after the kernel's out-of-memory killer killed one of its processes; it used {used}"
                )
            return
        if item.oom_baseline is None or not any(rc in (-9, 137) for rc in outcome.returncodes):
            return
        count = _proctree.oom_kill_count()
        if count is not None and count > item.oom_baseline:
            outcome.failure = kinds.MEMORY
            outcome.error = (
                f"killed by the kernel's out-of-memory killer (SIGKILL) after using "
                f"{format_memory(outcome.peak_memory)}"
            )

    def _check_final_peak(self, item: _Item, outcome: Outcome) -> None:
        """A strict job whose processes' final peak (the kernel's rusage, the samples) is above
        its `m` failed over its memory, though no sample stopped it (a short job, or this process
        stopped while it ran): its `m` is a limit, not a guess. A cgroup's peak is left out: it
        counts the page cache of files the job wrote, which the samples' limit does not."""
        spec = item.spec
        strict = self.strict_memory if spec.strict is None else spec.strict
        peak = outcome.process_peak
        if strict and spec.memory is not None and outcome.failure is None and peak is not None and peak > spec.memory:
            outcome.failure = kinds.MEMORY
            outcome.error = strict_overuse(peak, spec.memory, ended=True)

    # -- on the monitor thread ---------------------------------------------------------------------

    def _check_memory(self, measures: List[Tuple[Any, int]]) -> None:
        """After each sample: stop jobs over the budget, strict jobs over their `m`, and the newest
        job when the machine runs short. Each stop names the run it was decided for."""
        self._oom_kills = _proctree.oom_kill_count()
        usages: List[Usage] = []
        items: Dict[int, Tuple[_Item, int]] = {}
        for (item, run), rss in measures:
            if item.runs != run:
                continue  # sampled before the job was started again
            item.last_rss = rss
            item.rss_floor = _floor(item.rss_window, rss, item.started)
            if item.stopping:
                continue
            strict = self.strict_memory if item.spec.strict is None else item.spec.strict
            declared = item.spec.memory or 0
            strict_m = strict and item.spec.memory is not None
            usages.append(Usage(item.seq, rss, declared, strict_m, item.started, _captured(item)))
            items[item.seq] = (item, run)
        if self._trace is not None:
            self._trace.sample((item.job_id, rss) for (item, run), rss in measures if item.runs == run)
        stops = strict_stops(usages)
        stopped = {s.key for s in stops}
        # The output captured for a running job is held in this process: it counts as the job's.
        stops += budget_stops([u for u in usages if u.key not in stopped], self.memory)
        for stop in stops:
            item, run = items[stop.key]
            item.stopping = True
            self._loop.call_soon_threadsafe(self._stop, item, run, stop.message, False)
        if stops or not self.memory_reserve or not usages:
            return
        available = available_memory(self._memory_groups)
        if available < self.memory_reserve:
            victim = newest(usages)
            if victim is not None:
                item, run = items[victim.key]
                item.stopping = True
                message = (
                    f"stopped and requeued: the machine had {format_memory(available)} available, under the "
                    f"{format_memory(self.memory_reserve)} reserve"
                )
                self._loop.call_soon_threadsafe(self._stop, item, run, message, True)

    def _stop(self, item: _Item, run: int, message: str, requeue: bool) -> None:
        if self._running.get(item.seq) is not item or item.runs != run or item.handle is None:
            return
        final = requeue and item.requeued >= _MAX_REQUEUES
        if final:
            message = message.replace("stopped and requeued", "stopped") + f" ({_MAX_REQUEUES} times; giving up)"
        # Only a stop that started the kill decides what follows: a job already ending (exited,
        # or in a timeout's grace) keeps its own outcome.
        started = item.handle.kill(kinds.MEMORY, message, grace=0)
        item.requeue = started and requeue and not final
        item.shortage_final = started and final

    def _kill_job(self, future: JobFuture[Any], failure: str, message: str, grace: Optional[float] = None) -> None:
        """Stop the job of `future` (any thread): kill its run, or cancel it while queued. For a
        backend's kill of a job this executor runs for it (see _dask)."""

        def kill() -> None:
            for item in self._running.values():
                if item.future is future and item.handle is not None:
                    item.handle.kill(failure, message, grace)
                    return
            if future.cancel():  # queued here: never started
                self._dispatch()
                self._maybe_close()

        self._loop.call_soon_threadsafe(kill)

    def _on_shutdown(self, cancel_queued: bool, kill_reason: Optional[str]) -> None:
        # After a plain shutdown the queued jobs still run, as in the standard library.
        self._closing = True
        self._terminating = self._terminating or kill_reason is not None
        if cancel_queued:
            reason = kill_reason or "the executor was shut down with cancel_futures=True"
            for held in self._held.values():
                for item in held:
                    self._delivery.cancel(item.future)
                    self._trace_cancel(item, f"cancelled before it started: {reason}")
            self._held.clear()
            self._held_count = 0
            for item in self._scheduler.clear():
                if item.last_result is None:
                    self._delivery.cancel(item.future)
                    self._trace_cancel(item, f"cancelled before it started: {reason}")
                else:  # a retry or a requeued run that had not started: its future is running
                    result = _cancelled_again(item, item.last_result, reason)
                    self._trace_cancel(item, result.error or "")
                    self._resolve(item, result)
        else:
            self._dispatch()  # drops the jobs cancelled while queued, which may be all that is left
        if kill_reason is not None:
            for item in list(self._running.values()):
                if item.handle is not None:
                    item.handle.kill(kinds.CANCELLED, f"killed: {kill_reason}")
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._closing and not self._closed and not self._running and not self._scheduler and not self._held_count:
            self._closed = True
            try:
                self._monitor.close()
                self._launcher.close()
                if self._recorder is not None:
                    self._recorder.close(wait=False)  # its thread finishes writing; joined in _wait
                if self._own_backend:
                    self.backend.close()
            finally:  # whatever failed, the trace ends, the loop stops and waiters are released
                if self._trace is not None:
                    self._trace.close()
                self._delivery.close()
                self._loop.stop()
                _live_executors.discard(self)


def _cancelled(item: _Item) -> bool:
    """A queued job whose future was cancelled (a retry's future is running, and cannot be)."""
    return item.future.cancelled_now()


def _captured(item: _Item) -> int:
    """Bytes of the job's output this process holds while it runs (a local command's)."""
    return getattr(item.handle, "captured", 0)


def _floor(window: Deque[Tuple[float, int]], rss: int, started: float) -> int:
    """Record a sample; return the least resident size over the last _AVAILABLE_LAG seconds, or
    0 for a job younger than that (its memory may not show in the machine's figure yet)."""
    now = time.monotonic()
    window.append((now, rss))
    while len(window) > 1 and window[1][0] <= now - _AVAILABLE_LAG:
        window.popleft()  # keep one sample at or before the start of the window
    if now - started < _AVAILABLE_LAG:
        return 0
    return min(sample for _, sample in window)


def _need(item: _Item) -> int:
    """Bytes a job is expected to need: its `m`, or more if a run stopped for the machine's sake was
    seen to use more (with a margin: it may have been still growing)."""
    return max(item.spec.memory or 0, item.requeue_need)


def _cancelled_again(item: _Item, last: JobResult, reason: str) -> JobResult:
    """The result of a job whose next run (a retry, or after a requeue) was cancelled."""
    return dataclasses.replace(
        last,
        failure=kinds.CANCELLED,
        error=f"{last.error}; cancelled before it could run again: {reason}",
        attempts=item.attempts,
        requeued=item.requeued,
    )


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
    result = kinds.never_ran(spec, job_id, kinds.PICKLE, str(exc), attempts=0, exception=exc)
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


def _stop_loop(loop: EventLoop, monitor: Monitor, recorder: Optional[Recorder], trace: Optional[Trace]) -> None:
    monitor.close()
    if trace is not None:
        trace.close()
    loop.call_soon_threadsafe(loop.stop)
    if recorder is not None:
        recorder.close(wait=False)


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
    history = sys.modules.get("mpmsub._history")  # none to close where it was never imported
    if history is not None:
        history.close_recorders()  # the rows of executors shut down without waiting


try:
    threading._register_atexit(_at_exit)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - Python without the hook
    import atexit

    atexit.register(_at_exit)

"""The seed's batch API: `mpmsub.cluster(...)`, `.jobs.append(...)`, `.run()`, `.profile()`.

A thin layer over MemoryAwareExecutor: the Cluster validates and queues jobs, and keeps their
results and statistics; each run is a _Batch, which runs the jobs through one executor of its own
and draws the progress bar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    NoReturn,
    Optional,
    Set,
    TextIO,
    Tuple,
    Union,
    overload,
)

from mpmsub._backends.base import resolve as resolve_backend
from mpmsub._backends.base import size as backend_size
from mpmsub._engine.devices import GpuDevices
from mpmsub._engine.executor import (
    DEFAULT_OUTPUT_LIMIT,
    ExecutorStatus,
    MemoryAwareExecutor,
    RunningJob,
    check_learning,
)
from mpmsub._engine.future import JobFuture
from mpmsub._job import pick_one, to_spec
from mpmsub._policy.ledger import Ledger
from mpmsub._policy.scheduler import check_policy
from mpmsub._report.progress import ProgressBar
from mpmsub._result import CANCELLED, KILLED, JobResult, never_ran
from mpmsub._spec import JobSpec
from mpmsub._units import MB, MemoryLike, format_memory, parse_cpus, parse_memory, parse_resources
from mpmsub.utils import as_original_dict, format_duration
from mpmsub.utils import format_memory as format_mb

# The report's texts and the trace are imported where used: `import mpmsub` loads neither.
if TYPE_CHECKING:
    from mpmsub._report.trace import PathLike

logger = logging.getLogger("mpmsub")

_REFRESH = 0.5  # seconds between redraws of the progress bar while no job ends


class QueuedJob(Dict[str, Any]):
    """A queued job as the original's job dict (`job["p"]`, `job["m"]` in MB, ...), read-only:
    changing it would not change the job, so it refuses."""

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            f"queued job {self.get('id')!r} is read-only; set its p, m, ... before queueing it "
            "(or clear() the queue and append it again)"
        )

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> Tuple[Any, ...]:  # copy and pickle without __setitem__
        return (QueuedJob, (dict(self),))


class JobList:
    """The cluster's queue of jobs. `append` and `extend` validate at once (against the cluster's
    budget and backend) and return job ids; iterating or indexing gives each queued job as the
    original's dict (a QueuedJob). It keeps the ids taken in the cluster: a job's id stays taken
    after it ran, so ids are unique within a cluster."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._specs: List[JobSpec] = []
        self._ids: Set[str] = set()
        self._custom_ids: Set[str] = set()  # those the jobs were given (not made up here)
        self._next_auto = 1

    def append(self, job: Any) -> str:
        """Queue one job (a dict, a Job, a Pipeline, a list of strings, or a Python call as
        `mpmsub.Call(fn, *args)`); return its id."""
        return self.extend([job])[0]

    def extend(self, jobs: Iterable[Any]) -> List[str]:
        """Queue several jobs; all are validated before any is queued. Return their ids."""
        specs = self._admit(list(jobs))
        self._specs.extend(specs)
        return [spec.job_id or "" for spec in specs]

    def clear(self) -> None:
        """Drop every queued job (their ids may be used again)."""
        for spec in self._specs:
            self._ids.discard(spec.job_id or "")
            self._custom_ids.discard(spec.job_id or "")
        self._specs.clear()

    def _admit(self, items: List[Any]) -> List[JobSpec]:
        specs: List[JobSpec] = []
        claimed: List[str] = []
        next_auto = self._next_auto
        backend = self._cluster.backend
        try:
            for item in items:
                spec = to_spec(item)
                request = spec.request
                if spec.job_id is not None:
                    job_id = self._unique_id(spec.job_id)
                    self._custom_ids.add(job_id)
                else:
                    job_id = self._next_auto_id()
                self._ids.add(job_id)
                claimed.append(job_id)
                if spec.gpus:
                    self._cluster._gpus.ready(self._cluster._capacity)
                why = self._cluster._capacity.why_never_fits(request)
                if why is not None:
                    raise ValueError(f"job {job_id!r} can never run on this cluster: {why}")
                nowhere = None if backend.local else backend.why_never_fits(spec)
                if nowhere is not None:
                    raise ValueError(f"job {job_id!r} can never run on {backend!r}: {nowhere}")
                specs.append(dataclasses.replace(spec, job_id=job_id))
        except BaseException:  # nothing of a refused batch stays claimed, auto ids included
            self._ids.difference_update(claimed)
            self._custom_ids.difference_update(claimed)
            self._next_auto = next_auto
            raise
        return specs

    def _unique_id(self, wanted: str) -> str:
        """`wanted`, or where it is taken, `wanted_2`, `wanted_3`, ... (the first one free)."""
        if wanted not in self._ids:
            return wanted
        if self._cluster._refuse_duplicate_ids:
            raise ValueError(f"duplicate job id {wanted!r}: ids must be unique within a cluster")
        number = 2
        while f"{wanted}_{number}" in self._ids:
            number += 1
        logger.warning("mpmsub: job id %r is taken in this cluster; this job runs as %r", wanted, f"{wanted}_{number}")
        return f"{wanted}_{number}"

    def _next_auto_id(self) -> str:
        while True:
            job_id = f"job_{self._next_auto:04d}"
            self._next_auto += 1
            if job_id not in self._ids:
                return job_id

    def _take(self) -> List[JobSpec]:
        specs, self._specs = self._specs, []
        return specs

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[QueuedJob]:
        return iter([QueuedJob(as_original_dict(spec)) for spec in self._specs])

    @overload
    def __getitem__(self, index: int) -> QueuedJob: ...

    @overload
    def __getitem__(self, index: slice) -> List[QueuedJob]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[QueuedJob, List[QueuedJob]]:
        if isinstance(index, slice):
            return [QueuedJob(as_original_dict(spec)) for spec in self._specs[index]]
        return QueuedJob(as_original_dict(self._specs[index]))

    def __repr__(self) -> str:
        return f"<JobList of {len(self)} queued job(s)>"


class Cluster:
    """A batch of jobs run under a CPU and memory budget (the seed's API).

    `cpus`/`memory` default to what this machine offers (or the backend: `backend` is where
    jobs run, as for MemoryAwareExecutor, by default `MPMSUB_BACKEND` or this machine).
    `verbose` logs job starts and ends to stderr through the 'mpmsub' logger; `progress_bar`
    shows progress on stderr. `schedule` is the order in which `run()` starts jobs: "pack"
    (the default: largest memory first, and among equals the longest runtime measured so far
    first), "fifo" (the order they were added) or "greedy"; see MemoryAwareExecutor. A job's
    `priority` comes before all of these.

    `history`, `auto_memory` and `probe_memory` are MemoryAwareExecutor's: every run (and every
    measurement of `profile()`) is recorded in the run history, and jobs with `m="auto"` (every
    job without `m`, with `auto_memory=True`) have their memory predicted from it.

    `trace` is a file each `run()` (and `profile()`) writes its trace to, anew (see
    MemoryAwareExecutor); `report()` makes an HTML report of the last one, with or without it.
    `resources` (named pools) and `gpus` (devices) are MemoryAwareExecutor's too.
    """

    def __init__(
        self,
        cpus: Optional[int] = None,
        memory: Optional[MemoryLike] = None,
        verbose: bool = True,
        progress_bar: bool = True,
        schedule: str = "pack",
        backend: Any = None,
        history: Any = True,
        auto_memory: bool = False,
        probe_memory: Optional[MemoryLike] = None,
        trace: Optional[PathLike] = None,
        output_limit: Optional[MemoryLike] = DEFAULT_OUTPUT_LIMIT,
        resources: Optional[Mapping[str, int]] = None,
        gpus: Any = None,
    ) -> None:
        self.schedule = check_policy(schedule)
        self.trace: Optional[PathLike] = None
        if trace is not None:
            from mpmsub._report.trace import check_target

            self.trace = check_target(trace)
        self.backend = resolve_backend(backend)
        self._whole = not self.backend.local and cpus is None and memory is None  # all a remote backend has
        self.max_cpus, self._memory = backend_size(
            self.backend,
            None if cpus is None else parse_cpus(cpus, "cpus"),
            None if memory is None else parse_memory(memory, "memory"),
        )
        if self._memory <= 0:
            raise ValueError(f"invalid memory {memory!r}: the cluster needs a positive memory budget")
        # Checked here, at once, by the executor's own rules (and kept as given, for each run's).
        self._learning = {"history": history, "auto_memory": auto_memory, "probe_memory": probe_memory}
        check_learning(history, auto_memory, probe_memory, self._memory)
        self._output_limit = output_limit
        if output_limit is not None and not parse_memory(output_limit, "output_limit"):
            raise ValueError(f"invalid output_limit {output_limit!r}: expected a size above 0, or None to keep all")
        self.verbose = bool(verbose)
        self.progress_bar = bool(progress_bar)
        self.jobs = JobList(self)
        self.completed_jobs: List[JobResult] = []
        self.failed_jobs: List[JobResult] = []
        self._results: List[JobResult] = []
        # A taken id is renamed (with a warning), as the original accepted it; the command line,
        # whose joblog finds jobs by id, refuses it instead.
        self._refuse_duplicate_ids = False
        self.resources: Dict[str, int] = {} if resources is None else parse_resources(resources)
        self._gpus = GpuDevices(gpus, self.backend.local)  # None: detected when a job first asks for one
        self._capacity = Ledger(
            self.max_cpus, self._memory, None, self.resources, self._gpus.places(), here=self.backend.local
        )
        self._wall_time: Optional[float] = None
        self._max_workers: Optional[int] = None
        self._runtimes: Dict[str, float] = {}  # command line -> runtime of its last successful run
        self._active: Optional[_Batch] = None  # the run under way
        self._stop: Optional[BaseException] = None  # set (by a signal handler) to stop the run
        self._last_trace: Optional[List[Dict[str, Any]]] = None  # the last run's, kept where no file is

    @property
    def max_memory_mb(self) -> float:
        return self._memory / MB

    @property
    def max_memory(self) -> int:
        """The memory budget in bytes."""
        return self._memory

    def __repr__(self) -> str:
        return (
            f"mpmsub.Cluster(cpus={self.max_cpus}, memory={self.max_memory_mb:.0f}M, "
            f"{len(self.jobs)} queued, {len(self.completed_jobs)} completed, {len(self.failed_jobs)} failed)"
        )

    # -- running ----------------------------------------------------------------------------------

    def run(
        self,
        max_workers: Optional[int] = None,
        schedule: Optional[str] = None,
        on_result: Optional[Callable[[JobResult], None]] = None,
    ) -> Dict[str, Any]:
        """Run every queued job with the scheduler; return the stats dict.

        `schedule` overrides the cluster's for this run. `on_result` is called with each job's
        result as it ends, in this thread. Ctrl-C kills the running jobs, records the queued ones
        as cancelled, keeps the results so far, and re-raises KeyboardInterrupt.
        """
        return self._run(max_workers, schedule, on_result)

    def _run(
        self,
        max_workers: Optional[int] = None,
        schedule: Optional[str] = None,
        on_result: Optional[Callable[[JobResult], None]] = None,
        on_end: Optional[Callable[[JobResult], None]] = None,
    ) -> Dict[str, Any]:
        """run(), and `on_end` called with each job's result the moment it is known, on mpmsub's
        results thread (for the command line's joblog: quick, and never raising)."""
        workers = None if max_workers is None else parse_cpus(max_workers, "max_workers")
        policy = self.schedule if schedule is None else check_policy(schedule)
        specs = self.jobs._take()
        if policy == "pack":
            # The executor orders by memory; within equal memory it keeps this order: the
            # longest known runtime first, and jobs never measured (perhaps long) before those.
            specs.sort(key=lambda spec: -self._runtimes.get(spec.describe(), math.inf))
        self._max_workers = workers
        executor = self._executor(max_workers=workers, schedule=policy)
        self._execute(executor, specs, label="", on_result=on_result, on_end=on_end)
        return self.stats

    def profile(self, verbose: bool = True) -> List[JobResult]:
        """Run the queued jobs one at a time, ignoring their memory reservations, and measure each.

        Prints (when `verbose`) each job's measured peak and a recommended `m` (peak + 20%), with
        a ready-to-paste snippet. Returns the results; the jobs move to completed/failed.
        """
        specs = self.jobs._take()
        originals = {spec.job_id or "": spec for spec in specs}
        unreserved = [dataclasses.replace(spec, memory=None, auto=False) for spec in specs]
        executor = self._executor(max_workers=1, schedule="fifo", auto_memory=False)
        results = self._execute(executor, unreserved, label="profiling")
        if verbose:
            from mpmsub._report import text as _report

            print(_report.profile_text(results, originals, self.jobs._custom_ids, self.max_cpus, self._memory))
        return results

    def _executor(self, max_workers: Optional[int], schedule: str, **learning: Any) -> _RunExecutor:
        # The executor takes a bare number of memory as MB (the seed's unit).
        learning = {**self._learning, **learning, "trace": self.trace}
        learning["output_limit"] = self._output_limit
        learning["resources"] = self.resources
        learning["gpus"] = self._gpus  # the devices as this cluster found them (or detects them)
        if self._whole:  # the executor sizes itself by the backend (and hands it jobs ahead)
            return _RunExecutor(max_workers=max_workers, schedule=schedule, backend=self.backend, **learning)
        return _RunExecutor(
            cpus=self.max_cpus,
            memory=self._memory / MB,
            max_workers=max_workers,
            schedule=schedule,
            backend=self.backend,
            **learning,
        )

    def _execute(
        self,
        executor: _RunExecutor,
        specs: List[JobSpec],
        label: str,
        on_result: Optional[Callable[[JobResult], None]] = None,
        on_end: Optional[Callable[[JobResult], None]] = None,
    ) -> List[JobResult]:
        """Run `specs` on `executor` as one batch, the run under way until it ends."""
        batch = self._active = _Batch(self, executor, specs, label)
        try:
            return batch.run(on_result, on_end)
        finally:
            self._wall_time = time.monotonic() - batch.started
            self._active = None
            self._last_trace = executor.trace_events()
            batch.close()

    def kill(self, job_id: str, reason: Optional[str] = None) -> bool:
        """Kill one job of the run under way, from another thread or from `on_result`: a
        running job's whole process tree, or a job still queued (it never starts). Its result
        has failure "killed" and counts among the failed jobs and as killed in `stats` and the
        summary; it is not retried. Returns whether it stopped the job: False once it has ended,
        and when no run is under way. An id never added raises ValueError."""
        if not isinstance(job_id, str):
            raise TypeError(f"kill() takes a job's id (a string); got {job_id!r} ({type(job_id).__name__})")
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"reason must be a string or None; got {reason!r}")
        batch = self._active
        if batch is not None and job_id in batch.ids:
            return batch.kill(job_id, reason)
        if job_id in self.jobs._ids or any(r.job_id == job_id for r in self._results):
            return False  # not in the run under way (none is): nothing of it runs
        raise ValueError(f"no job {job_id!r} was added to this cluster")

    def running(self) -> List[RunningJob]:
        """The jobs of the run under way that run now (see MemoryAwareExecutor.running)."""
        batch = self._active
        return [] if batch is None else batch.executor.running()

    def _cancel_queued(self) -> None:
        """Start no more of the run's jobs: the queued ones are cancelled, the running ones
        finish (from any thread; for --halt soon)."""
        batch = self._active
        if batch is not None:
            batch.cancel_queued()

    def _raise_stop(self) -> None:
        """Raise what a signal handler asked the run to stop with, if it did."""
        stop, self._stop = self._stop, None
        if stop is not None:
            raise stop

    def _record(self, result: JobResult, spec: JobSpec) -> JobResult:
        self._results.append(result)
        if result.success:
            self._runtimes[spec.describe()] = result.runtime  # the key run() orders by
        (self.completed_jobs if result.success else self.failed_jobs).append(result)
        if self.verbose:
            if result.success:
                logger.info(
                    "mpmsub: %s done in %.2f s, peak %.1f MB", result.job_id, result.runtime, result.memory_used
                )
            elif result.failure == KILLED:
                logger.info("mpmsub: %s KILLED: %s", result.job_id, result.error)
            else:
                logger.info("mpmsub: %s FAILED: %s", result.job_id, result.error)
        return result

    def _echo(self, text: str, stream: TextIO) -> None:
        """Write text to a stream without breaking the progress bar, if one is drawn."""
        batch = self._active
        if batch is not None:
            batch.bar.write_above(text, stream, end="")
        else:
            stream.write(text)
            stream.flush()

    # -- reporting --------------------------------------------------------------------------------

    @property
    def stats(self) -> Dict[str, Any]:
        """Statistics of every job run so far: `stats["jobs"]["total"|"completed"|"failed"]`, ...
        (`failed` is every job that did not succeed, those counted in `cancelled` and `killed`
        among them); `stats["cluster"]` has its `gpus` (how many) and named `resources` too.

        Also the original's keys: `cluster` `max_cpus`, `max_memory_mb`, `max_memory` ('2.0G'),
        `runtime` and `runtime_formatted` (of the last run, or the one under way); `jobs`
        `pending` (queued) and `running`; `resources` (what running jobs reserve)."""
        from mpmsub._report import text as _report

        stats = _report.job_stats(
            self._results,
            cpus=self.max_cpus,
            memory=self._memory,
            wall_time=self._wall_time,
            max_workers=self._max_workers,
            resources=self.resources,
            gpus=len(self._gpus.devices or ()),  # none until a job asks for one, where not given
        )
        active = self._active
        pending = len(self.jobs)
        if active is None:
            runtime, running, cpus, reserved = self._wall_time or 0.0, 0, 0, 0
        else:  # a run under way (stats read from on_result, or another thread)
            status = active.executor.status()
            runtime, running, pending = time.monotonic() - active.started, status.running, pending + status.queued
            cpus, reserved = status.reserved_cpus, status.reserved_memory
        stats["cluster"].update(
            max_cpus=self.max_cpus,
            max_memory_mb=self.max_memory_mb,
            max_memory=format_mb(self.max_memory_mb),
            runtime=runtime,
            runtime_formatted=format_duration(runtime),
        )
        stats["jobs"].update(pending=pending, running=running)
        stats["resources"] = {
            "cpu_slots_used": cpus,
            "memory_used": format_mb(reserved / MB),
            "active_jobs": running,
        }
        return stats

    @property
    def job_queue(self) -> JobQueue:
        """The original's view of the queue: `pending_jobs` (as dicts), `completed_jobs`, `failed_jobs`."""
        return JobQueue(self)

    def print_summary(self) -> None:
        """Print a readable report of the jobs run so far."""
        from mpmsub._report import text as _report

        print(_report.summary_text(self.stats, self._results))

    def report(self, path: PathLike, *, plots: Optional[bool] = None) -> bool:
        """Write an HTML report of the last `run()` (or `profile()`) to `path`: one self-contained
        file with a timeline of the jobs, memory and CPUs over time, requested versus used memory,
        the slowest and failed jobs, and memory advice. Figures need matplotlib (`pip install
        'mpmsub[plot]'`); without it (or with `plots=False`) the report has the tables alone.
        Returns whether it has the figures."""
        if self._wall_time is None:
            raise RuntimeError("nothing has run yet: call run() before report()")
        from mpmsub._report.html import report_to

        source: Any = self._last_trace if self._last_trace is not None else self.trace
        return report_to(source, path, plots, stacklevel=3)  # the warning points at the caller

    def describe_resources(self) -> None:
        """Print the cluster's CPUs and memory next to what this machine has, and its GPUs (given,
        or detected once a job asked for one) and named resources."""
        from mpmsub._report import text as _report

        text = _report.resources_text(self.max_cpus, self._memory, self.resources, self._gpus.places())
        if not self.backend.local:
            text = text.replace(" for jobs (this machine", f" for jobs on {self.backend!r} (this machine", 2)
        print(text)


class _Batch:
    """One run of a cluster's jobs (a `run()` or a `profile()`), made by the cluster for that run.

    It owns the run's executor, its progress bar and verbose logging, and its halt state: it
    submits the jobs, waits for their ends, records each result in the cluster, and on Ctrl-C
    (or what a signal handler asked the cluster to stop with) kills the running jobs and records
    the rest as cancelled. `run`, `on_result` and the bar's redraws are on the caller's thread;
    the futures' done-callbacks (and `on_end`) on mpmsub's results thread; `cancel_queued` may be
    called from any thread."""

    def __init__(self, cluster: Cluster, executor: _RunExecutor, specs: List[JobSpec], label: str) -> None:
        self.cluster = cluster
        self.executor = executor
        self.specs = specs
        self.started = time.monotonic()
        self.bar = ProgressBar(len(specs), label=label, enabled=cluster.progress_bar)
        self._level = logger.level
        self._handler = self._attach_verbose_handler()
        self.results: List[JobResult] = []
        self._failed = 0  # failures other than kills, for the bar: kills are counted apart
        self._killed_count = 0
        self._futures: Dict[Future[Any], JobSpec] = {}
        # Each future says when it is done: waiting costs the same however many are pending.
        # A Queue, not a SimpleQueue: SimpleQueue.get(timeout) can fail to return after the
        # process was stopped and continued (Ctrl-Z, fg), and a Ctrl-C then never gets through.
        self._ended: queue.Queue[Future[Any]] = queue.Queue()
        # cancel_queued(): no more jobs start. The lock keeps it apart from the submissions.
        self._halt_lock = threading.RLock()  # re-entered by a callback run at once in submit
        self._halting = False
        self._submitted = False  # every job of the run is submitted
        self.ids = {spec.job_id for spec in specs}
        self._by_id: Dict[str, Future[Any]] = {}
        self._kills: Dict[str, Optional[str]] = {}  # kill() of jobs not submitted yet: id -> reason
        self._killed_early: List[Tuple[JobSpec, Optional[str]]] = []  # such jobs, never submitted
        self._taken = 0  # specs submitted, or not submitted for their kill
        self._killed: Dict[str, Optional[str]] = {}  # jobs killed by kill(): id -> reason

    def run(
        self, on_result: Optional[Callable[[JobResult], None]], on_end: Optional[Callable[[JobResult], None]]
    ) -> List[JobResult]:
        """Run every job of the batch; return their results, in the order they ended."""
        cluster = self.cluster
        try:
            if cluster.verbose:
                logger.info(
                    "mpmsub: running %d job(s) on %d CPUs, %s memory",
                    len(self.specs),
                    cluster.max_cpus,
                    format_memory(cluster._memory),
                )
            self._submit(on_end)
            for spec, reason in self._killed_early:  # kill() reached them before they were submitted
                self._keep(_killed_before(spec, reason), spec, on_result)
            for spec in self.specs[self._taken :]:  # those cancel_queued() stopped before submission
                self._keep(_cancelled(spec, None), spec, on_result)
            while len(self.results) < len(self.specs):
                self._wait(on_result)
            self.executor.shutdown(wait=True)
        except BaseException as exc:
            self._stop_all(exc, on_result)
            raise
        return self.results

    def _submit(self, on_end: Optional[Callable[[JobResult], None]]) -> None:
        ended = self._ended

        def on_done(future: Future[Any]) -> None:
            try:
                usage = getattr(future, "usage", None)
                if on_end is not None and usage is not None:
                    on_end(usage)
            finally:  # whatever on_end did, the run hears of the end
                ended.put(future)

        for spec in self.specs:
            self.cluster._raise_stop()  # a signal takes effect while a long batch is submitted too
            with self._halt_lock:
                if self._halting:
                    break
                self._taken += 1
                if spec.job_id in self._kills:  # killed while the batch was being submitted: never
                    self._killed_early.append((spec, self._kills.pop(spec.job_id or "")))
                    continue
                submitted = self.executor.submit(spec)
                self._futures[submitted] = spec
                self._by_id[spec.job_id or ""] = submitted
                submitted.add_done_callback(on_done)
        with self._halt_lock:
            self._submitted = True
            if self._halting:
                self.executor.shutdown(wait=False, cancel_futures=True)

    def _wait(self, on_result: Optional[Callable[[JobResult], None]]) -> None:
        """Record the jobs that end within a refresh, and redraw the bar."""
        done = []
        with contextlib.suppress(queue.Empty):
            done.append(self._ended.get(timeout=_REFRESH))
            while True:
                done.append(self._ended.get_nowait())
        self.cluster._raise_stop()
        for future in done:
            spec = self._futures[future]
            if future.cancelled():
                if spec.job_id in self._killed:
                    result = _killed_before(spec, self._killed[spec.job_id or ""])
                else:
                    result = _cancelled(spec, None)
            else:
                result = _usage(future)
            self._keep(result, spec, on_result)
        status = self.executor.status()
        self.bar.update(
            len(self.results),
            self._failed,
            status.running,
            status.reserved_memory,
            status.memory_in_use,
            killed=self._killed_count,
            held=self._held(status),
        )

    def _held(self, status: ExecutorStatus) -> List[Tuple[str, int, int]]:
        """The GPUs and named resources the running jobs hold, of the run's, for the bar."""
        held = []
        devices = self.cluster._gpus.devices
        if devices:  # (none where a remote backend has them: its own scheduler places jobs there)
            held.append(("gpu", len(status.gpus_in_use), len(devices)))
        pools = self.cluster.resources
        held += [(name, status.reserved_resources.get(name, 0), pools[name]) for name in sorted(pools)]
        return held

    def kill(self, job_id: str, reason: Optional[str]) -> bool:
        """Kill one of the batch's jobs (any thread)."""
        with self._halt_lock:
            if job_id not in self._by_id:  # not submitted yet: killed as it is
                if self._submitted or self._halting or job_id in self._kills:
                    return False
                self._kills[job_id] = reason
                return True
        return self._kill_submitted(job_id, reason)

    def _kill_submitted(self, job_id: str, reason: Optional[str]) -> bool:
        future = self._by_id[job_id]
        assert isinstance(future, JobFuture)
        self._killed[job_id] = reason  # before the kill: its end may be read before kill() returns
        stopped = self.executor.kill(future, reason)
        if not stopped:
            self._killed.pop(job_id, None)  # it ended, or a halt cancelled it: its own result says
        return stopped

    def _stop_all(self, exc: BaseException, on_result: Optional[Callable[[JobResult], None]]) -> None:
        """Kill the running jobs; record every job not yet recorded as it ended or as cancelled."""
        self.executor.terminate(f"stopped by {type(exc).__name__}")
        seen = {r.job_id for r in self.results}
        by_spec = {id(spec): future for future, spec in self._futures.items()}
        for spec in self.specs:  # those a signal stopped before they were submitted too
            if spec.job_id in seen:
                continue
            gone = by_spec.get(id(spec))
            result = _usage(gone) if gone is not None and not gone.cancelled() else _cancelled(spec, exc)
            self._keep(result, spec, on_result)

    def _keep(self, result: JobResult, spec: JobSpec, on_result: Optional[Callable[[JobResult], None]]) -> None:
        self.results.append(self.cluster._record(result, spec))
        killed = result.failure == KILLED
        self._failed += not result.success and not killed
        self._killed_count += killed
        if on_result is not None:
            on_result(result)

    def cancel_queued(self) -> None:
        """Start no more jobs: the queued ones are cancelled, the running ones finish."""
        with self._halt_lock:
            self._halting = True
            if self._submitted:
                self.executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Close the bar and take the verbose handler off the logger."""
        self.bar.close()
        if self._handler is not None:
            logger.removeHandler(self._handler)
            logger.setLevel(self._level)

    def _attach_verbose_handler(self) -> Optional[logging.Handler]:
        if not self.cluster.verbose:
            return None
        handler = _BarHandler(self.bar)
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        return handler


class JobQueue:
    """The original's `cluster.job_queue`, read-only: the queued jobs as its dicts, and the results."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    @property
    def pending_jobs(self) -> List[QueuedJob]:
        return list(self._cluster.jobs)

    @property
    def completed_jobs(self) -> List[JobResult]:
        return self._cluster.completed_jobs

    @property
    def failed_jobs(self) -> List[JobResult]:
        return self._cluster.failed_jobs


class _BarHandler(logging.Handler):
    """Verbose output on stderr that keeps the progress bar intact."""

    def __init__(self, bar: ProgressBar) -> None:
        super().__init__(logging.DEBUG)
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.bar.write_above(self.format(record))
        except Exception:
            self.handleError(record)


class _RunExecutor(MemoryAwareExecutor):
    """The executor of one cluster run: it keeps its trace in memory, for report()."""

    _keeps_trace = True

    def trace_events(self) -> Optional[List[Dict[str, Any]]]:
        """The events of its trace, kept in memory (None where it was written to a file)."""
        trace = self._core.trace
        return None if trace is None or trace.path is not None else trace.events


def _usage(future: Future[Any]) -> JobResult:
    """The JobResult of a finished job or call (a call's future resolves to its value)."""
    usage = getattr(future, "usage", None)
    return usage if isinstance(usage, JobResult) else future.result()


def _cancelled(spec: JobSpec, exc: Optional[BaseException]) -> JobResult:
    """The result of a job that never started: stopped by `exc`, or (None) cancelled while queued."""
    why = "the run was halted" if exc is None else type(exc).__name__
    return never_ran(spec, spec.job_id or "", CANCELLED, f"cancelled before it started: {why}")


def _killed_before(spec: JobSpec, reason: Optional[str]) -> JobResult:
    """The result of a job killed (Cluster.kill) while it waited to start."""
    return never_ran(spec, spec.job_id or "", KILLED, "killed before it started" + (f": {reason}" if reason else ""))


def cluster(
    p: Optional[int] = None,
    m: Optional[MemoryLike] = None,
    cpu: Optional[int] = None,
    cpus: Optional[int] = None,
    memory: Optional[MemoryLike] = None,
    verbose: bool = True,
    progress_bar: bool = True,
    schedule: str = "pack",
    backend: Any = None,
    history: Any = True,
    auto_memory: bool = False,
    probe_memory: Optional[MemoryLike] = None,
    trace: Optional[PathLike] = None,
    output_limit: Optional[MemoryLike] = DEFAULT_OUTPUT_LIMIT,
    describe: bool = False,
    resources: Optional[Mapping[str, int]] = None,
    gpus: Any = None,
) -> Cluster:
    """Create a Cluster: `mpmsub.cluster(p=4, m="8G")`; `cpu`/`cpus` and `memory` are aliases.
    With `describe`, print its resources beside the machine's (`describe_resources()`)."""
    made = Cluster(
        cpus=pick_one("CPU count", p=p, cpu=cpu, cpus=cpus),
        memory=pick_one("memory", m=m, memory=memory),
        verbose=verbose,
        progress_bar=progress_bar,
        schedule=schedule,
        backend=backend,
        history=history,
        auto_memory=auto_memory,
        probe_memory=probe_memory,
        trace=trace,
        output_limit=output_limit,
        resources=resources,
        gpus=gpus,
    )
    if describe:
        made.describe_resources()
    return made

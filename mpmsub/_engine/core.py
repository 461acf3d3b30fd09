"""The executor's core: what happens to a job between the executor's inbox and its future, on the
loop thread.

`MemoryAwareExecutor` (the public face, `_executor`) validates a job and hands it to the loop;
from then on the `Core` owns it. A job is an `Item` whose `state` (`RunState`) says where it
stands, and every change of state goes through `Core._move`, which keeps the containers (the
queue, the held jobs, the running jobs) in step with it:

    SUBMITTED -> QUEUED -> STARTING -> RUNNING -> (STOPPING) -> DONE
        |          ^  |        |          |            |
        +-> HELD --+  +--------+----------+------------+--> CANCELLED (before a run started)
                      ^                   |            |
                      +---- a retry or a requeue <-----+

A job cancelled before its run started ends in one place (`Core._drop`). The rules (what follows
a run's end, the live gate, m="auto"'s placement) are pure functions in `_policy`; the scheduler
and the ledger decide what starts; the launcher runs it; the monitor thread samples the running
jobs and asks for stops (`MemoryWatch`, the only code here that runs on another thread, which
writes only its own `Run` fields).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from mpmsub._engine.delivery import Delivery
from mpmsub._engine.future import JobFuture
from mpmsub._engine.outcome import cancelled_again, make_result, resolve
from mpmsub._launch import proctree as _proctree
from mpmsub._launch.base import Handle, Launcher, Outcome, not_started
from mpmsub._policy import runs as _policy
from mpmsub._policy.enforce import Stop, Usage, budget_stops, gpu_overuse, newest, strict_stops
from mpmsub._policy.ledger import Ledger
from mpmsub._policy.scheduler import Scheduler
from mpmsub._result import CANCELLED, ERROR, EXIT, KILLED, MEMORY, FailureKind, JobResult
from mpmsub._spec import Request
from mpmsub._system import available_memory
from mpmsub._units import MB, format_memory

if TYPE_CHECKING:
    from mpmsub._launch.loop import EventLoop
    from mpmsub._learn.estimate import Estimate
    from mpmsub._learn.runbook import RunBook
    from mpmsub._report.trace import Trace
    from mpmsub._spec import JobSpec

logger = logging.getLogger("mpmsub")

_GATE_RETRY = 0.5  # seconds between looks at the machine's free memory while a job waits for it
_GATHER = 0.05  # seconds between the first job of a key never seen and the choice of its probe


class RunState(enum.Enum):
    """Where a job stands."""

    SUBMITTED = "submitted"  # in the executor's inbox: the loop has not seen it yet
    HELD = "held"  # m="auto" of a key never measured: waits for its key's probe
    QUEUED = "queued"  # in the scheduler's queue (a retry and a requeue too)
    STARTING = "starting"  # chosen, its resources reserved; not yet handed to the launcher
    RUNNING = "running"  # the launcher runs it; its exit is awaited
    STOPPING = "stopping"  # mpmsub started killing it (memory, a kill order); its exit is awaited
    DONE = "done"  # its final result went to its future
    CANCELLED = "cancelled"  # cancelled before its run (or its next run) started


_S = RunState
_MOVES: Dict[RunState, Set[RunState]] = {
    _S.SUBMITTED: {_S.HELD, _S.QUEUED},
    _S.HELD: {_S.QUEUED, _S.CANCELLED},
    _S.QUEUED: {_S.STARTING, _S.CANCELLED},
    _S.STARTING: {_S.RUNNING, _S.CANCELLED},
    _S.RUNNING: {_S.STOPPING, _S.QUEUED, _S.DONE},
    _S.STOPPING: {_S.QUEUED, _S.DONE},
    _S.DONE: set(),
    _S.CANCELLED: set(),
}
_RUNS = (_S.RUNNING, _S.STOPPING)


class Lifecycle(enum.IntEnum):
    """Where an executor stands; it only moves forward (`Core.advance`)."""

    OPEN = 0  # takes jobs
    SHUT_DOWN = 1  # takes no more jobs; the loop has not been told yet
    CLOSING = 2  # the loop knows: it closes once the jobs it holds have ended
    TERMINATING = 3  # as CLOSING, and running jobs are killed, nothing runs again
    CLOSED = 4  # the launcher, the monitor and the loop are stopped


class Run:
    """One run of a job. The monitor thread writes `rss`, `floor`, `window` and `stopping` (and
    nothing else of the engine's); the loop reads them."""

    __slots__ = ("floor", "gpu_peak", "gpu_stopped", "handle", "number", "rss", "started", "stopping", "window")

    def __init__(self, number: int, started: float) -> None:
        self.number = number  # 1 for the first run of its job
        self.started = started  # monotonic
        self.handle: Optional[Handle] = None
        self.rss = 0  # resident bytes at the last sample
        # The least it used over the last AVAILABLE_LAG seconds (0 while younger than that): what
        # the kernel's count of available memory is sure to show.
        self.floor = 0
        self.window: Deque[Tuple[float, int]] = deque()
        self.stopping = False  # a stop for memory is on its way
        self.gpu_peak: Optional[int] = None  # bytes: its tree's GPU memory peak on a device, where NVML measures it
        self.gpu_stopped = False  # the stop for memory was for its GPU memory (gpu strict)


class Item:
    """A submitted job on its way through the executor (the loop's, but for `run`'s own fields)."""

    __slots__ = (
        "attempts",
        "auto",
        "auto_retries",
        "bound",
        "devices",
        "estimate",
        "future",
        "input_size",
        "job_id",
        "key",
        "killed",
        "last_result",
        "oom_baseline",
        "place_memory",
        "probe",
        "requeue",
        "requeue_need",
        "requeued",
        "retries_left",
        "run",
        "seq",
        "shortage_final",
        "spec",
        "state",
        "submitted",
        "takes_free",
    )

    def __init__(self, seq: int, spec: JobSpec, job_id: str, future: JobFuture[Any], grace: float) -> None:
        self.seq = seq
        self.spec = spec
        self.state = RunState.SUBMITTED
        # The longest a run can last: its timeout, then the kill's grace and a margin to reap it.
        self.bound = None if spec.timeout is None else spec.timeout + grace + 1.0
        self.job_id = job_id
        self.future = future
        future._job_id = job_id  # how kill(future) finds it (Core.live)
        self.run: Optional[Run] = None  # the current (or last) run
        self.attempts = 0
        self.retries_left = spec.retries
        self.requeued = 0
        self.submitted = time.monotonic()
        self.requeue = False  # stopped for the machine's sake: put it back in the queue when it has ended
        self.requeue_need = 0  # bytes: the largest peak of its runs stopped for the machine's sake, + margin
        self.shortage_final = False  # stopped for the machine's sake once too often
        self.oom_baseline: Optional[int] = None
        self.last_result: Optional[JobResult] = None
        # kill(): the message its result gives, and whether it replaces the failure of a run that
        # was already ending (a memory stop under way); nothing runs again once it is set.
        self.killed: Optional[Tuple[str, bool]] = None
        # The run history (m="auto"): its key and input size (None: no history, no auto), whether
        # its memory is predicted, from what, and whether it is the probe of its key.
        self.key: Optional[str] = None
        self.input_size = 0
        self.auto = spec.auto
        self.auto_retries = 0
        self.estimate: Optional[Estimate] = None
        self.probe = False
        self.takes_free = False  # a probe that takes what is free when it starts
        self.place_memory: Optional[int] = None  # the most one place of a remote backend offers
        self.devices: Tuple[int, ...] = ()  # the GPU devices its run holds

    @property
    def request(self) -> Request:
        return self.spec.request

    @property
    def priority(self) -> int:
        return self.spec.priority

    @property
    def runs(self) -> int:
        return 0 if self.run is None else self.run.number

    @property
    def ends_by(self) -> Optional[float]:
        """The latest (monotonic) time the current run can end; None without a timeout."""
        return None if self.bound is None or self.run is None else self.run.started + self.bound

    @property
    def captured(self) -> int:
        """Bytes of the job's output this process holds while it runs (a local command's)."""
        return getattr(None if self.run is None else self.run.handle, "captured", 0)


def held_beside(spec: JobSpec, devices: Tuple[int, ...]) -> Optional[Dict[str, Any]]:
    """What a run holds beside CPUs and memory, for its trace: GPU devices (and the memory it
    reserves on each) and named resources; None when nothing."""
    held: Dict[str, Any] = {}
    if spec.gpus:
        held["gpus"] = list(devices) if devices else spec.gpus
        if spec.gpu_memory is not None:
            held["gpu_memory"] = spec.gpu_memory
    if spec.resources:
        held["resources"] = dict(spec.resources)
    return held or None


class Settings(NamedTuple):
    """What the core is given by the executor: its budget and rules, and its collaborators."""

    memory: int  # bytes: the budget
    cpus: int
    kill_grace: float
    strict_memory: bool
    memory_reserve: int  # bytes; 0: no live gate, no stops for the machine's sake
    probe_memory: Optional[int]  # None: a probe takes what is free when it starts
    memory_groups: Any  # a container's limit, read with the machine's figure
    close_backend: Optional[Callable[[], None]] = None  # the backend, where the executor made it
    on_closed: Optional[Callable[[], None]] = None  # told when the core has closed
    clock: Callable[[], float] = time.monotonic
    # The environment naming a job's GPU devices (CUDA_VISIBLE_DEVICES, ...), where the launcher
    # runs jobs on this machine.
    gpu_env: Optional[Callable[[Tuple[int, ...]], Dict[str, str]]] = None


class Core:
    """The loop thread's manager of jobs: queue, dispatch, start, end, stop and close."""

    def __init__(
        self,
        settings: Settings,
        loop: EventLoop,
        launcher: Launcher,
        ledger: Ledger,
        scheduler: Scheduler[Item],
        trace: Optional[Trace],
        runbook: Optional[RunBook],
        monitor_interval: Optional[float],
    ) -> None:
        self.settings = settings
        self.loop = loop
        self.launcher = launcher
        self.ledger = ledger
        self.scheduler = scheduler
        self.trace = trace
        self.runbook = runbook  # m="auto"'s past runs, and the history's recorder
        self.owner: Any = None  # the executor: alive while its core is (see MemoryAwareExecutor)
        self.delivery = Delivery()
        self.lifecycle = Lifecycle.OPEN
        self.running: Dict[int, Item] = {}
        self.live: Dict[str, Item] = {}  # the jobs taken and not yet ended, by id (for kill)
        self.held_count = 0
        self.auto = AutoPlacement(self)
        self.watch = MemoryWatch(self)
        self.gate = LiveGate(self)
        self.monitor: Any = _NoMonitor()
        self._flush_posted = False  # a call of launcher.flush is queued on the loop
        if launcher.defers_start:
            launcher.on_begin = self._began
        if monitor_interval is not None:
            from mpmsub._engine.monitor import Monitor

            self.monitor = Monitor(monitor_interval, self.watch.check, launcher.housekeeping)

    # -- states ----------------------------------------------------------------------------------

    def _move(self, item: Item, to: RunState, front: bool = False) -> None:
        """The one change of a job's state: checked against the allowed moves, with the queue,
        the running jobs and the count of held ones kept in step."""
        was = item.state
        if to not in _MOVES[was]:
            raise RuntimeError(f"mpmsub: job {item.job_id!r} cannot go from {was.value} to {to.value}")
        item.state = to
        if (to is RunState.DONE or to is RunState.CANCELLED) and self.live.get(item.job_id) is item:
            del self.live[item.job_id]
        if was is RunState.HELD:
            self.held_count -= 1
        elif was in _RUNS and to not in _RUNS:
            del self.running[item.seq]
        if to is RunState.HELD:
            self.held_count += 1
        elif to is RunState.QUEUED:
            if front:
                self.scheduler.push_front(item)
            else:
                self.scheduler.push(item)
        elif to is RunState.RUNNING:
            self.running[item.seq] = item

    def _drop(self, item: Item, reason: Optional[str] = None, notified: bool = False, killed: bool = False) -> None:
        """A job cancelled before its run (or its next run) started. Without `reason`, its future
        was cancelled by its caller (and, with `notified`, its waiters were woken already); with
        one, mpmsub cancels it: a job never run is cancelled, a retry's or requeue's gets its last
        result, marked cancelled. With `killed`, kill() took it out of the queue: `reason` is the
        kill's message, and a retry's result is marked killed."""
        if item.state is RunState.STARTING:
            self.ledger.release(item.request, item.seq)
        self._move(item, RunState.CANCELLED)
        error = "cancelled before it started" + ("" if reason is None else f": {reason}")
        if killed:
            error = reason or ""
        result = None
        if reason is not None and item.last_result is not None:  # its future is running: a result
            result = cancelled_again(
                item.last_result, reason, item.attempts, item.requeued, KILLED if killed else CANCELLED
            )
            error = result.error or ""
        if self.trace is not None:  # the trace's last word on it comes before its waiters wake
            self.trace.cancelled(item.job_id, item.runs + 1, error, KILLED if killed else CANCELLED)
        if result is not None:
            resolve(self.delivery, item.future, item.spec, result)
        elif notified:
            pass  # cancelled, its waiters woken already
        elif reason is not None and not item.future.cancelled_now():  # (kill() cancelled it already)
            self.delivery.cancel(item.future)
        else:  # cancelled by its caller, or by kill() on its caller's thread
            item.future.set_running_or_notify_cancel()  # wakes wait() and as_completed()
        if item.probe:
            self.auto.probe_ended(item)

    def advance(self, to: Lifecycle) -> None:
        """Move the executor's lifecycle forward to `to` (never back)."""
        self.lifecycle = max(self.lifecycle, to)

    # -- the way in ----------------------------------------------------------------------------

    def take(self, items: Iterable[Item]) -> None:
        """The jobs submitted since the last call: queued, or (m="auto") placed."""
        auto = []
        live = self.live
        for item in items:
            live[item.job_id] = item
            if item.spec.gpu_auto:
                self._gpu_estimate(item)
            if item.auto:
                auto.append(item)
            else:
                self._move(item, RunState.QUEUED)
        if auto:
            self.auto.place(auto)
        self.dispatch()

    def most(self, item: Item) -> int:
        return _policy.most_memory(self.settings.memory, item.place_memory)

    def _gpu_estimate(self, item: Item) -> None:
        """gpu(n, memory="auto"): the GPU memory its key's measured runs predict, on each of its
        devices (at most a device's); whole devices while none was measured (NVML measures)."""
        pool = self.ledger.gpus
        largest = pool.largest
        if self.runbook is None or item.key is None or not pool.counted or largest is None:
            return
        model = self.runbook.model(item.key, gpu=True)
        guess = None if model is None else model.at(item.input_size)
        if guess is not None:
            item.spec = dataclasses.replace(item.spec, gpu_memory=min(guess.memory, largest))

    # -- starting jobs ---------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start every job the scheduler (and the live gate) lets start now."""
        self.gate.new_round()
        try:
            while True:
                chosen, cancelled = self.scheduler.select(
                    self.ledger, self.running.values(), self.settings.clock(), self.gate.admits, _cancelled
                )
                for item in cancelled:  # taken out of the queue by select()
                    self._drop(item)
                if not chosen:
                    return
                for item in chosen:
                    self._move(item, RunState.STARTING)
                    future = item.future
                    if future.running():  # a retried or requeued job's
                        self._start(item)
                    elif self.launcher.defers_start:
                        # Its future stays pending until the run begins there (_began); cancel()
                        # meanwhile takes it back from the backend (take_back).
                        future._handed = True
                        if future.cancelled_now():
                            self._drop(item)
                        else:
                            self._start(item)
                    elif future.set_running_or_notify_cancel():
                        self._start(item)
                    else:  # cancelled since it was chosen
                        self._drop(item, notified=True)
        finally:
            self.gate.round_ended()

    def _start(self, item: Item) -> None:
        if item.takes_free:  # a probe: what is free joins its share (AutoPlacement.launch_probe)
            item.takes_free = False
            old = item.request
            grab = _policy.grabbed_memory(old.memory, self.ledger.free_memory, self.most(item))
            item.spec = dataclasses.replace(item.spec, memory=grab)
            self.ledger.release(old, item.seq)
            self.ledger.reserve(item.request, item.seq)
        if not self.running:  # the monitor's count may be stale after an idle spell
            self.watch.oom_kills = _proctree.oom_kill_count()
        self._move(item, RunState.RUNNING)
        self.gate.started(item)
        item.attempts += 1
        run = item.run = Run(item.runs + 1, self.settings.clock())
        item.requeue = item.shortage_final = False
        item.oom_baseline = self.watch.oom_kills if self.launcher.local else None
        spec = item.spec
        item.devices = self.ledger.devices(item.seq)
        if self.trace is not None:
            held = held_beside(spec, item.devices)
            self.trace.started(item.job_id, run.number, spec.cpus, spec.memory, spec.describe(), item.submitted, held)
        logger.debug("mpmsub: start %s (%s): %s", item.job_id, spec.describe_resources(), spec.describe())

        def on_exit(outcome: Outcome) -> None:
            self.loop.call_soon_threadsafe(self._on_exit, item, run, outcome)

        if item.devices and self.settings.gpu_env is not None:
            spec = dataclasses.replace(spec, env={**(spec.env or {}), **self.settings.gpu_env(item.devices)})
        try:
            run.handle = self.launcher.start(spec, item.job_id, on_exit)
        except Exception as exc:  # a launcher bug or a backend failure: record it on the job
            logger.exception("mpmsub: could not start job %s", item.job_id)
            on_exit(not_started(item.spec, ERROR, f"mpmsub could not start the job: {exc!r}"))
            return
        if self.launcher.groups_starts and not self._flush_posted:
            # After the callbacks already queued (the ends of a batch of results, each starting
            # the next job): the launcher hands all their starts over at once.
            self._flush_posted = True
            self.loop.call_soon_threadsafe(self._flush)
        if self.launcher.local:
            self.monitor.watch(run.handle, (item, run))

    # -- a run's end -----------------------------------------------------------------------------

    def _on_exit(self, item: Item, run: Run, outcome: Outcome) -> None:
        if item.run is not run or item.state not in _RUNS:
            return  # the end of an earlier run of a job started again
        self.ledger.release(item.request, item.seq)
        if run.handle is not None:
            self.monitor.unwatch(run.handle)
        strict = self.settings.strict_memory if item.spec.strict is None else item.spec.strict
        explain(outcome, item.spec, strict, item.oom_baseline)
        if outcome.gpus is None:
            outcome.gpus = item.devices
        if outcome.gpu_peak is None:
            outcome.gpu_peak = run.gpu_peak
        if item.killed is not None and item.killed[1] and outcome.failure not in (None, KILLED):
            # Killed while a memory stop was under way: the kill is what the user sees.
            outcome.failure, outcome.error = KILLED, f"{item.killed[0]} (it was being stopped: {outcome.error})"
        result = make_result(item.spec, item.job_id, outcome, item.attempts, item.requeued, item.estimate)
        item.last_result = result
        if self.launcher.defers_start and not item.future.running():
            # Ended before it began there (killed, lost): from here cancel() fails, as for a
            # running job; one that succeeded already wins (under the future's lock either way).
            item.future.begin()
        if item.future.cancelled_now():  # cancel() took it back before it began (take_back)
            self._taken_back(item, run, result)
            return
        if self.runbook is not None:
            self.runbook.learn(item.key, item.spec, item.input_size, result, item.requeue)
        again = self._run_again(item, result)
        if self.trace is not None:
            status = "requeued" if item.requeue and again else result.failure or "ok"
            self.trace.ended(item.job_id, run.number, status, not again, result)
        if again:
            self.dispatch()
            self._trace_idle()
            return
        self._move(item, RunState.DONE)
        if item.probe:
            self.auto.probe_ended(item)
        self.dispatch()  # start the next jobs before running the user's callbacks
        self._trace_idle()
        logger.debug("mpmsub: end %s: %s", item.job_id, result.error or "ok")
        resolve(self.delivery, item.future, item.spec, result)
        self.maybe_close()

    def _flush(self) -> None:
        self._flush_posted = False
        try:
            self.launcher.flush()
        except Exception:  # a launcher bug: its jobs' ends say what became of them
            logger.exception("mpmsub: could not hand the started jobs to the backend")

    def _began(self, job_id: str) -> None:
        """A run handed to a launcher that defers starts has begun there (any thread: no hop to
        the loop, a look at `live` and the future's own lock): its future is running, unless
        cancel() took it back meanwhile (take_back stops it)."""
        item = self.live.get(job_id)
        if item is not None:
            item.future.begin()

    def take_back(self, job_id: str) -> None:
        """cancel() succeeded on the future of a job handed to a launcher that defers starts
        (its caller's thread told the loop): stop its run, which had not begun there."""
        item = self.live.get(job_id)
        handle = None if item is None or item.run is None else item.run.handle
        if item is None or item.state is not RunState.RUNNING or item.killed is not None or handle is None:
            return
        item.future.wake_cancelled()  # wait() and as_completed() see it cancelled now
        if handle.kill(CANCELLED, "cancelled before it started"):
            self._move(item, RunState.STOPPING)

    def _taken_back(self, item: Item, run: Run, result: JobResult) -> None:
        """The end of a run whose future cancel() took back: no result, no retry; its waiters
        are woken (wait(), as_completed()) as for a job cancelled in the queue."""
        if self.trace is not None:
            self.trace.ended(item.job_id, run.number, CANCELLED, True, result)
        self._move(item, RunState.DONE)
        item.future.wake_cancelled()
        if item.probe:
            self.auto.probe_ended(item)
        self.dispatch()
        self._trace_idle()
        self.maybe_close()

    def _run_again(self, item: Item, result: JobResult) -> bool:
        """Requeue or retry a job that ended (_policy.again); False when its result is final."""
        spec = item.spec
        # A stop for GPU memory grows the job's GPU memory, not its m (and is no m="auto" miss).
        gpu_stop = result.failure == MEMORY and item.run is not None and item.run.gpu_stopped
        end = _policy.Ended(
            failure=EXIT if gpu_stop else result.failure,
            peak=int(result.memory_used * MB),
            memory=spec.memory,
            growth=spec.memory_growth,
            auto=item.auto,
            auto_retries=item.auto_retries,
            retries_left=item.retries_left,
            requeue=item.requeue,
            requeue_need=item.requeue_need,
            most=self.most(item),
            final=self.lifecycle >= Lifecycle.TERMINATING or item.shortage_final or item.killed is not None,
            after_miss=item.estimate.after_miss if item.estimate is not None else 0,
        )
        decision = _policy.next_run(end)
        if decision is None:
            return False
        if gpu_stop:
            grown = _policy.grown_gpu_memory(spec.gpu_memory or 0, spec.memory_growth, self.ledger.gpus.largest)
            if grown is None:
                return False  # no device holds more
            item.spec = dataclasses.replace(spec, gpu_memory=grown)
        elif decision.why != "requeue" and result.failure == MEMORY:
            bigger = dataclasses.replace(spec, memory=decision.memory)
            if not self.launcher.local and self.launcher.why_never_fits(bigger) is not None:
                return False  # no single worker or node can hold more: the backend would wait forever
            item.spec = bigger
        item.requeue_need = decision.requeue_need
        if decision.why == "requeue":
            item.requeued += 1
            item.attempts -= 1  # a stop for the machine's sake is not the job's failure
            logger.info("mpmsub: %s requeued: %s", item.job_id, result.error)
        else:
            if decision.why == "auto":
                item.auto_retries += 1
            else:
                item.retries_left -= 1
            logger.info(
                "mpmsub: %s failed (%s); retrying with %s", item.job_id, result.error, item.spec.describe_resources()
            )
        self._move(item, RunState.QUEUED, front=True)
        return True

    def _trace_idle(self) -> None:
        """Nothing runs now: the trace writes what waits (see Trace.idle)."""
        if self.trace is not None and not self.running:
            self.trace.idle()

    # -- stops, kills and the end ----------------------------------------------------------------

    def stop(self, item: Item, run: Run, message: str, requeue: bool) -> None:
        """A memory stop the monitor thread decided for `run`: kill it, at once."""
        if item.run is not run or item.state not in _RUNS or run.handle is None:
            return  # (a run being killed already is stopped at once: its grace ends now)
        final = False
        if requeue:
            message, final = _policy.shortage_stop(message, item.requeued)
        # Only a stop that started the kill decides what follows: a job already ending (exited,
        # or in a timeout's grace) keeps its own outcome.
        started = run.handle.kill(MEMORY, message, grace=0)
        item.requeue = started and requeue and not final
        item.shortage_final = started and final
        if started and item.state is RunState.RUNNING:
            self._move(item, RunState.STOPPING)

    def find(self, future: Optional[JobFuture[Any]], job_id: Optional[str]) -> Optional[Item]:
        """The job of `future` (or with `job_id`) that has not ended yet: running, queued or
        held; None when it has ended (or is not this executor's)."""
        if future is not None:
            job_id = future.__dict__.get("_job_id")
        item = self.live.get(job_id or "")
        if item is None or (future is not None and item.future is not future):
            return None
        return item

    def kill(self, item: Item, failure: FailureKind, message: str, grace: Optional[float] = None) -> Optional[bool]:
        """Stop one job (on the loop): kill its run's whole tree, or take a retry waiting in the
        queue out of it; nothing of it runs again. Returns whether this stopped it (a kill
        started, or it was being stopped for memory and its result is the kill's), or None for
        a job that never started: the caller cancels its future on its own thread, as cancel()
        does (its callbacks are never the loop's), then calls `drop_killed`."""
        state = item.state
        if state in _RUNS and item.run is not None and item.run.handle is not None:
            if item.killed is not None:
                return False  # killed already
            started = item.run.handle.kill(failure, message, grace)
            # A run already ending (it exited, or its timeout's kill is under way) keeps its own
            # result, but does not run again; one being stopped for memory ends as killed.
            item.killed = (message, not started and state is RunState.STOPPING)
            if started and state is RunState.RUNNING:
                self._move(item, RunState.STOPPING)
            return started or state is RunState.STOPPING
        if state not in (RunState.QUEUED, RunState.HELD):
            return False  # ended (the loop takes the inbox before any kill that follows a submit)
        if item.last_result is None:  # (a retry's future may be pending: see take_back)
            return None
        return self.drop_killed(item, message, True)  # a retry or requeue waiting: its last result, killed

    def drop_killed(self, item: Item, message: str, by_kill: bool) -> bool:
        """A queued job kill() stops: one that never started, whose future kill() has cancelled
        (`by_kill`; False: its caller had), or a retry or requeue waiting (`by_kill`): out of the
        queue now, its waiters woken. Returns `by_kill`."""
        if item.state in (RunState.QUEUED, RunState.HELD):  # (not dropped by a dispatch meanwhile)
            self._unqueue(item)
            if by_kill:
                item.killed = (message, False)
            self._drop(item, message if by_kill else None, killed=by_kill)
            self.dispatch()
            self.maybe_close()
        return by_kill

    def _unqueue(self, item: Item) -> None:
        if item.state is RunState.HELD:
            group = self.auto.held.get(item.key or "", [])
            if item in group:
                group.remove(item)
        elif not self.scheduler.remove(item):
            raise RuntimeError(f"mpmsub: job {item.job_id!r} is queued but not in the queue")

    def shut_down(self, cancel_queued: bool, kill_reason: Optional[str]) -> None:
        """The executor was shut down (with `kill_reason`: terminated): no more jobs will come."""
        self.advance(Lifecycle.CLOSING if kill_reason is None else Lifecycle.TERMINATING)
        if cancel_queued:
            reason = kill_reason or "the executor was shut down with cancel_futures=True"
            for item in self.auto.clear() + self.scheduler.clear():
                self._drop(item, reason)
            if kill_reason is None and self.launcher.defers_start:
                # Handed to the backend and not begun there: pending futures, cancelled too (on
                # the delivery thread, as cancel() on its caller's: take_back then stops them).
                for item in list(self.running.values()):
                    if not item.future.running():
                        self.delivery.cancel(item.future)
                        if item.future.cancelled_now():  # at once: no one was waiting on it
                            self.take_back(item.job_id)
        else:  # after a plain shutdown the queued jobs still run, as in the standard library
            self.dispatch()  # drops the jobs cancelled while queued, which may be all that is left
        if kill_reason is not None:
            for item in list(self.running.values()):
                if item.run is not None and item.run.handle is not None:
                    item.run.handle.kill(CANCELLED, f"killed: {kill_reason}")
        self.maybe_close()

    def maybe_close(self) -> None:
        if self.lifecycle not in (Lifecycle.CLOSING, Lifecycle.TERMINATING):
            return
        if self.running or self.scheduler or self.held_count:
            return
        self.advance(Lifecycle.CLOSED)
        try:
            self.monitor.close()
            self.watch.close_meter()
            self.launcher.close()
            if self.runbook is not None:
                self.runbook.close()  # its thread finishes writing; joined by the executor's wait
            if self.settings.close_backend is not None:
                self.settings.close_backend()
        finally:  # whatever failed, the trace ends, the loop stops and waiters are released
            if self.trace is not None:
                self.trace.close()
            self.delivery.close()
            self.loop.stop()
            if self.settings.on_closed is not None:
                self.settings.on_closed()

    # -- what the executor's callers may read (plain reads of the loop's counters) ---------------

    def in_use(self) -> int:
        """The running jobs' resident memory at their last sample, and the output held for them."""
        return sum((0 if i.run is None else i.run.rss) + i.captured for i in list(self.running.values()))


class LiveGate:
    """The live memory gate (_policy.gate_admits) of a dispatch round: the machine's available
    memory, read once per round, less the reserve and what running jobs have not yet touched,
    must hold a job with `m`; a job that waits is warned of once, and while jobs wait the round
    runs again every _GATE_RETRY seconds (free memory changes without an event to wait on)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.room: Optional[int] = None  # free memory above the reserve, this round (None: not read)
        self.admitted = 0  # jobs let through in this round (not yet running)
        self.timer = False
        self.warned: Set[int] = set()

    def new_round(self) -> None:
        self.room = None
        self.admitted = 0

    def round_ended(self) -> None:
        core = self.core
        if self.room is not None and core.scheduler and not self.timer:
            self.timer = True
            core.loop.call_later(_GATE_RETRY, self._retry)

    def _retry(self) -> None:
        self.timer = False
        self.core.dispatch()
        self.core.maybe_close()  # the round may have dropped the last (cancelled) jobs

    def started(self, item: Item) -> None:
        self.warned.discard(item.seq)

    def admits(self, item: Item) -> bool:
        """Whether `item` may start now, as far as the machine's free memory goes."""
        core = self.core
        need = _policy.need(item.spec.memory, item.requeue_need)
        reserve = core.settings.memory_reserve
        if not need or not reserve:
            return True
        if self.room is None:
            running = [
                (_policy.need(i.spec.memory, i.requeue_need), 0 if i.run is None else i.run.floor)
                for i in core.running.values()
            ]
            self.room = _policy.gate_room(available_memory(core.settings.memory_groups), reserve, running)
        alone = not core.running and not self.admitted
        if _policy.gate_admits(need, self.room, alone):
            self.room -= need
            self.admitted += 1
            return True
        if item.seq not in self.warned:
            self.warned.add(item.seq)
            logger.warning(
                "mpmsub: job %s waits for memory: it needs %s, the machine has %s available above the %s reserve",
                item.job_id,
                format_memory(need),
                format_memory(max(0, self.room)),
                format_memory(reserve),
            )
        return False


class AutoPlacement:
    """m="auto" in front of the queue: a job of a key with past runs is queued with its estimate;
    the others are held, and one of each key (the one with the most input) probes it."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.probes: Dict[str, Item] = {}  # the probe in flight of each key never measured
        self.held: Dict[str, List[Item]] = {}  # the jobs of such a key, held until it ends
        self.gathering: Set[str] = set()  # keys whose probe is about to be chosen

    def place(self, items: List[Item]) -> None:
        """Queue m="auto" jobs with their estimate where their key has runs; else hold them."""
        core = self.core
        for item in items:
            key = item.key or ""
            model = core.runbook.model(key) if core.runbook is not None else None
            guess = None if model is None else model.at(item.input_size)
            if guess is not None:
                item.spec = dataclasses.replace(item.spec, memory=min(guess.memory, core.most(item)), auto=False)
                item.estimate = guess
                core._move(item, RunState.QUEUED)
                continue
            self.held.setdefault(key, []).append(item)
            if item.state is not RunState.HELD:
                core._move(item, RunState.HELD)
            if key not in self.probes and key not in self.gathering:
                # The probe is chosen in a moment: the rest of a batch being submitted is then
                # here, and the job with the most input can be the one measured.
                self.gathering.add(key)
                core.loop.call_later(_GATHER, self.launch_probe, key)

    def launch_probe(self, key: str) -> None:
        """Queue the probe of a key never measured: of its held jobs, the one with the most input."""
        core = self.core
        self.gathering.discard(key)
        group = self.held.get(key)
        if not group or key in self.probes:
            return
        live = []
        for item in group:
            if _cancelled(item):  # cancelled while held: let go of it now (wakes its waiters)
                core._drop(item)
            else:
                live.append(item)
        if not live:
            del self.held[key]
            core.maybe_close()
            return
        probe = _policy.choose_probe(live, lambda i: i.input_size, lambda i: i.seq)
        live.remove(probe)
        self.held[key] = live
        self.probes[key] = probe
        probe.probe = True
        settings = core.settings
        memory, probe.takes_free = _policy.probe_reservation(
            settings.probe_memory, settings.memory, probe.spec.cpus, settings.cpus, core.most(probe)
        )
        probe.spec = dataclasses.replace(probe.spec, memory=memory, auto=False)
        from mpmsub._learn.estimate import Estimate

        probe.estimate = Estimate(memory, "probe", 0)
        core._move(probe, RunState.QUEUED)
        core.dispatch()

    def probe_ended(self, item: Item) -> None:
        """A probe's final end (or its cancel): its key's held jobs are placed again."""
        item.probe = False
        key = item.key or ""
        if self.probes.get(key) is item:
            del self.probes[key]
        held = self.held.pop(key, [])
        if held:
            self.place(held)

    def clear(self) -> List[Item]:
        """Every held job, no longer held here (the executor is cancelling them)."""
        items = [item for group in self.held.values() for item in group]
        self.held.clear()
        return items


class MemoryWatch:
    """On the monitor thread, after each sample: stop jobs over the budget, strict jobs over their
    `m`, and the newest job when the machine runs short. Each stop names the run it was decided
    for and goes to the loop (`Core.stop`)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        # The machine's count of OOM kills, at the last sample (read at a start after an idle spell).
        self.oom_kills = _proctree.oom_kill_count()
        self.gpu_meter: Any = None  # NVML, opened when a job with GPUs first runs (False: none here)

    def check(self, measures: List[Tuple[Any, int]]) -> None:
        core, settings = self.core, self.core.settings
        self.oom_kills = _proctree.oom_kill_count()
        usages: List[Usage] = []
        runs: Dict[int, Tuple[Item, Run]] = {}
        now = settings.clock()
        for (item, run), rss in measures:
            if item.run is not run:
                continue  # sampled before the job was started again
            run.rss = rss
            run.floor = _policy.floor(run.window, rss, now, run.started)
            if run.stopping:
                continue
            strict = settings.strict_memory if item.spec.strict is None else item.spec.strict
            declared = item.spec.memory or 0
            strict_m = strict and item.spec.memory is not None
            usages.append(Usage(item.seq, rss, declared, strict_m, run.started, item.captured))
            runs[item.seq] = (item, run)
        if core.trace is not None:
            core.trace.sample((item.job_id, rss) for (item, run), rss in measures if item.run is run)
        stops = strict_stops(usages)
        gpu_runs = [runs[u.key] for u in usages if runs[u.key][0].devices]
        if gpu_runs:
            stops += self._gpu_stops(gpu_runs, {s.key for s in stops})
        stopped = {s.key for s in stops}
        # The output captured for a running job is held in this process: it counts as the job's.
        stops += budget_stops([u for u in usages if u.key not in stopped], settings.memory)
        for stop in stops:
            item, run = runs[stop.key]
            run.stopping = True
            core.loop.call_soon_threadsafe(core.stop, item, run, stop.message, False)
        if stops or not settings.memory_reserve or not usages:
            return
        available = available_memory(settings.memory_groups)
        if available < settings.memory_reserve:
            victim = newest(usages)
            if victim is not None:
                item, run = runs[victim.key]
                run.stopping = True
                message = (
                    f"stopped and requeued: the machine had {format_memory(available)} available, under the "
                    f"{format_memory(settings.memory_reserve)} reserve"
                )
                core.loop.call_soon_threadsafe(core.stop, item, run, message, True)

    def close_meter(self) -> None:
        """Let go of NVML (a monitor tick still under way finds it closed: it reads nothing)."""
        meter, self.gpu_meter = self.gpu_meter, False
        if meter:
            meter.close()

    def _gpu_stops(self, gpu_runs: List[Tuple[Item, Run]], stopped: Set[int]) -> List[Stop]:
        """Measure the GPU memory of the runs that hold devices (their trees' processes, by NVML),
        and the stops of those with gpu strict over what they reserved."""
        if self.gpu_meter is None:
            self.gpu_meter = _meter()
        meter = self.gpu_meter
        if not meter:
            return []
        stops = []
        for item, run in gpu_runs:
            if run.handle is None:
                continue
            used = max(meter.by_device(run.handle.tree), default=0)  # as reserved: on each device
            if run.gpu_peak is None or used > run.gpu_peak:
                run.gpu_peak = used
            reserved = item.spec.gpu_memory
            if item.spec.gpu_strict and reserved is not None and used > reserved and item.seq not in stopped:
                run.gpu_stopped = True
                stops.append(Stop(item.seq, gpu_overuse(used, reserved)))
        return stops


def _meter() -> Any:
    from mpmsub._launch import gpus as _gpus

    return _gpus.GpuMeter.open() or False


class _NoMonitor:
    """The monitor of a core that samples nothing (a core under test with a fake launcher)."""

    def watch(self, handle: Handle, tag: Any) -> None:
        pass

    def unwatch(self, handle: Handle) -> None:
        pass

    def close(self) -> None:
        pass


def explain(outcome: Outcome, spec: JobSpec, strict: bool, oom_baseline: Optional[int]) -> None:
    """Name the failures only the engine can see in a run's outcome: a kill by the kernel's
    out-of-memory killer (the machine's count read only for a SIGKILL), and a strict job whose
    final peak is over its `m`."""
    count = None
    if (
        oom_baseline is not None
        and not outcome.oom_kills
        and outcome.failure is None
        and _policy.sigkilled(outcome.returncodes)
    ):
        count = _proctree.oom_kill_count()
    why = _policy.oom_failure(
        outcome.returncodes, outcome.failure, outcome.oom_kills or 0, outcome.peak_memory, oom_baseline, count
    )
    if why is None:
        why = _policy.final_peak_failure(strict, spec.memory, outcome.failure, outcome.process_peak)
    if why is not None:
        outcome.failure, outcome.error = MEMORY, why


def _cancelled(item: Item) -> bool:
    """A queued job whose future was cancelled (a retry's future is running, and cannot be)."""
    return item.future.cancelled_now()

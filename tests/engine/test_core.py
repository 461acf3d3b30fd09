"""The executor's loop core (mpmsub._engine.core) driven by hand: a fake launcher whose jobs end when the
test says, a loop whose callbacks run when the test says, and a clock the test moves. The
sequences that real processes can only provoke by chance (a stop racing an exit, a stop of a run
that has been replaced, a probe cancelled after it was chosen) run here exactly, in one thread."""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
from typing import Any, Callable, List, Optional, Tuple

import pytest

from mpmsub._engine.core import Core, Item, Lifecycle, RunState, Settings
from mpmsub._engine.future import JobFuture
from mpmsub._job import Job, to_spec
from mpmsub._launch.base import Handle, Launcher, Outcome
from mpmsub._learn.runbook import RunBook
from mpmsub._policy import runs as _policy
from mpmsub._policy.ledger import Ledger
from mpmsub._policy.scheduler import Scheduler
from mpmsub._result import JobResult
from mpmsub._spec import JobSpec
from mpmsub._units import MB


class FakeLoop:
    """Callbacks queued until `run()`; timers due by the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.ready: List[Tuple[Callable[..., Any], Tuple[Any, ...]]] = []
        self.timers: List[Tuple[float, int, Callable[..., Any], Tuple[Any, ...]]] = []
        self.order = itertools.count()
        self.stopped = False

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        self.ready.append((fn, args))

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        heapq.heappush(self.timers, (self.clock.now + delay, next(self.order), fn, args))

    def stop(self) -> None:
        self.stopped = True

    def run(self) -> None:
        """Run every callback ready, and every timer due, until none is left."""
        while self.ready or (self.timers and self.timers[0][0] <= self.clock.now):
            if self.ready:
                fn, args = self.ready.pop(0)
            else:
                _, _, fn, args = heapq.heappop(self.timers)
            fn(*args)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeHandle(Handle):
    def __init__(self, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None]) -> None:
        self.spec, self.job_id, self.on_exit = spec, job_id, on_exit
        self.killed: Optional[Tuple[str, str]] = None
        self.kills: List[Tuple[str, Optional[float]]] = []  # every kill asked for: failure, grace
        self.ended = False

    def kill(self, failure: Any, message: str, grace: Optional[float] = None) -> bool:
        self.kills.append((failure, grace))
        if self.ended or self.killed is not None:
            return False  # (a kill without grace during another's grace hastens it, as escalate() does)
        self.killed = (failure, message)
        return True

    def end(self, returncode: int = 0, peak_mb: float = 10, oom_kills: int = 0) -> None:
        """The job's processes end: with the kill's failure where it was killed."""
        self.ended = True
        failure, error = self.killed if self.killed is not None else (None, None)
        if failure is not None:
            returncode = -9
        self.on_exit(
            Outcome([returncode], "", "", 0.0, 1.0, 0.1, int(peak_mb * MB), failure, error, oom_kills=oom_kills)
        )


class FakeLauncher(Launcher):
    local = False  # no sampling, no OOM counts of this machine

    def __init__(self) -> None:
        self.handles: List[FakeHandle] = []
        self.closed = False

    def start(self, spec: JobSpec, job_id: str, on_exit: Callable[[Outcome], None]) -> Handle:
        handle = FakeHandle(spec, job_id, on_exit)
        self.handles.append(handle)
        return handle

    def close(self) -> None:
        self.closed = True

    def running(self, job_id: str) -> FakeHandle:
        (handle,) = [h for h in self.handles if h.job_id == job_id and not h.ended]
        return handle


class Rig:
    """A core with its fakes, and the jobs given to it."""

    def __init__(
        self,
        cpus: int = 2,
        memory_mb: int = 1000,
        probe_memory: Optional[int] = None,
        trace: Any = None,
        defers_start: bool = False,
    ) -> None:
        self.clock = FakeClock()
        self.loop = FakeLoop(self.clock)
        self.launcher = FakeLauncher()
        self.launcher.defers_start = defers_start  # as Dask's: a job handed over begins later
        settings = Settings(
            memory=memory_mb * MB,
            cpus=cpus,
            kill_grace=1.0,
            strict_memory=False,
            memory_reserve=0,
            probe_memory=probe_memory,
            memory_groups=None,
            clock=self.clock,
        )
        ledger = Ledger(cpus, memory_mb * MB)
        self.core = Core(
            settings, self.loop, self.launcher, ledger, Scheduler("fifo"), trace, RunBook(None), monitor_interval=None
        )  # type: ignore[arg-type]
        self.seq = itertools.count()
        self.items: List[Item] = []

    def submit(self, job: Any, key: Optional[str] = None, input_size: int = 0) -> Item:
        spec = to_spec(job)
        item = Item(next(self.seq), spec, spec.job_id or f"j{len(self.items)}", JobFuture(), 1.0)
        item.key, item.input_size = key, input_size
        self.items.append(item)
        self.core.take([item])
        self.loop.run()
        return item

    def end(self, item: Item, returncode: int = 0, peak_mb: float = 10) -> None:
        self.launcher.running(item.job_id).end(returncode, peak_mb)
        self.loop.run()

    def kill(self, item: Item, message: str = "killed on request", failure: str = "killed", grace: float = 1.0) -> bool:
        """core.kill, as the executor calls it: a job that never started is cancelled here,
        then dropped by the core."""
        stopped = self.core.kill(item, failure, message, grace)  # type: ignore[arg-type]
        if stopped is not None:
            return stopped
        cancelled_before = item.future.cancelled()
        assert item.future.cancel()
        return self.core.drop_killed(item, message, not cancelled_before)

    def states(self) -> List[str]:
        return [item.state.value for item in self.items]

    def scheduler_items(self) -> List[Item]:
        return list(self.core.scheduler)


def result_of(item: Item) -> JobResult:
    assert item.future.done()
    usage = item.future.usage
    assert usage is not None
    return usage


def test_jobs_start_as_capacity_frees_and_their_futures_get_results() -> None:
    rig = Rig(cpus=2)
    a, b, c = (rig.submit(Job(["tool", str(i)]).cpu(1)) for i in range(3))
    assert rig.states() == ["running", "running", "queued"]
    rig.end(a)
    assert rig.states() == ["done", "running", "running"]
    assert result_of(a).success and result_of(a).attempts == 1
    rig.end(b, returncode=3)
    assert result_of(b).failure == "exit" and "status 3" in (result_of(b).error or "")
    rig.end(c)
    assert rig.states() == ["done", "done", "done"]
    assert rig.core.lifecycle is Lifecycle.OPEN and not rig.core.running


def test_a_retry_goes_back_to_the_head_of_the_queue_with_more_memory() -> None:
    rig = Rig(cpus=1)
    a = rig.submit(Job(["tool"]).memory("100M").with_retries(1))
    b = rig.submit(Job(["other"]))
    rig.launcher.running("j0").kill("memory", "over its m")
    rig.end(a)
    assert a.state is RunState.RUNNING and b.state is RunState.QUEUED  # ahead of the queued job
    assert a.spec.memory == 200 * MB and a.attempts == 2 and a.retries_left == 0
    rig.end(a)
    assert result_of(a).success and result_of(a).attempts == 2


def test_a_stop_that_arrives_after_the_exit_changes_nothing() -> None:
    rig = Rig()
    a = rig.submit(Job(["tool"]).memory("100M"))
    run = a.run
    assert run is not None
    rig.launcher.running("j0").end(0)  # the exit is on its way to the loop ...
    rig.loop.call_soon_threadsafe(rig.core.stop, a, run, "used too much", False)  # ... then the stop
    rig.loop.run()
    assert result_of(a).success and a.state is RunState.DONE


def test_a_stop_decided_for_an_earlier_run_does_not_touch_the_retry() -> None:
    rig = Rig()
    a = rig.submit(Job(["tool"]).with_retries(1))
    first = a.run
    assert first is not None
    rig.end(a, returncode=1)
    assert a.state is RunState.RUNNING and a.run is not first  # retried at once
    rig.core.stop(a, first, "used too much", False)  # the monitor's stop of the first run
    handle = rig.launcher.running("j0")
    assert handle.killed is None
    handle.end(0)
    rig.loop.run()
    assert result_of(a).success and result_of(a).attempts == 2


def test_a_requeue_costs_no_attempt_and_gives_up_after_the_most_requeues() -> None:
    rig = Rig()
    a = rig.submit(Job(["tool"]).memory("100M"))
    message = "stopped and requeued: the machine had 1M available, under the 2M reserve"
    for count in range(_policy.MAX_REQUEUES + 1):
        run = a.run
        assert run is not None
        rig.core.stop(a, run, message, True)
        assert a.state is RunState.STOPPING
        rig.end(a, peak_mb=150)
        if count < _policy.MAX_REQUEUES:
            assert a.state is RunState.RUNNING and a.requeued == count + 1 and a.attempts == 1
            assert a.requeue_need == 180 * MB  # its peak and the margin profile() adds
    result = result_of(a)
    assert result.failure == "memory" and result.requeued == _policy.MAX_REQUEUES
    assert result.error is not None and result.error.endswith("(3 times; giving up)")


def test_a_job_cancelled_while_queued_is_dropped_once() -> None:
    rig = Rig(cpus=1)
    a = rig.submit(Job(["tool"]))
    b = rig.submit(Job(["other"]))
    assert b.future.cancel()
    rig.end(a)
    assert b.state is RunState.CANCELLED and b.future.cancelled()
    assert [h.job_id for h in rig.launcher.handles] == ["j0"]


def test_a_probe_cancelled_after_it_was_chosen_hands_its_key_to_the_next() -> None:
    rig = Rig(cpus=1)
    blocker = rig.submit(Job(["blocker"]))
    small = rig.submit(Job(["tool", "s"]).memory("auto"), key="tool", input_size=10)
    big = rig.submit(Job(["tool", "b"]).memory("auto"), key="tool", input_size=500)
    assert small.state is RunState.HELD and big.state is RunState.HELD
    rig.clock.now += 0.1  # the probe is chosen once the batch is in
    rig.loop.run()
    assert big.probe and big.state is RunState.QUEUED and small.state is RunState.HELD
    assert big.future.cancel()  # cancelled while queued as the probe
    rig.end(blocker)
    assert big.state is RunState.CANCELLED and not big.probe
    rig.clock.now += 0.1
    rig.loop.run()
    assert small.probe and small.state is RunState.RUNNING
    assert small.spec.memory == 1000 * MB  # a probe takes what is free when it starts
    rig.end(small, peak_mb=40)
    assert result_of(small).memory_estimate == "probe"


def test_killing_a_held_job_and_a_queued_probe_hands_the_key_to_the_next() -> None:
    rig = Rig(cpus=1)
    blocker = rig.submit(Job(["blocker"]))
    held = [rig.submit(Job(["tool", str(i)]).memory("auto"), key="tool", input_size=i) for i in (10, 20, 500)]
    rig.clock.now += 0.1
    rig.loop.run()
    small, middle, big = held
    assert big.probe and big.state is RunState.QUEUED and rig.core.held_count == 2
    assert rig.kill(middle, "killed on request")  # held: out of its key's group
    assert middle.future.cancelled() and rig.core.held_count == 1
    assert rig.kill(big, "killed on request")  # the probe, queued
    assert big.future.cancelled() and not big.probe
    rig.clock.now += 0.1
    rig.loop.run()
    assert small.probe and small.state is RunState.QUEUED  # the next probe of the key
    rig.end(blocker)
    rig.end(small)
    assert rig.states() == ["done", "done", "cancelled", "cancelled"] and rig.core.held_count == 0


def test_jobs_of_a_key_with_runs_are_queued_with_their_estimate() -> None:
    rig = Rig(cpus=1)
    probe = rig.submit(Job(["tool"]).memory("auto"), key="tool")
    rig.clock.now += 0.1
    rig.loop.run()
    rig.end(probe, peak_mb=40)
    later = rig.submit(Job(["tool"]).memory("auto"), key="tool")
    assert later.state is RunState.RUNNING and later.estimate is not None
    assert 40 * MB <= (later.spec.memory or 0) < 100 * MB


def test_terminate_cancels_the_queue_kills_the_running_and_retries_nothing() -> None:
    rig = Rig(cpus=1)
    a = rig.submit(Job(["tool"]).with_retries(3))
    b = rig.submit(Job(["other"]))
    rig.core.advance(Lifecycle.SHUT_DOWN)
    rig.core.shut_down(True, "stopped by the test")
    assert b.state is RunState.CANCELLED and b.future.cancelled()
    assert rig.launcher.running("j0").killed == ("cancelled", "killed: stopped by the test")
    assert rig.core.lifecycle is Lifecycle.TERMINATING and not rig.loop.stopped
    rig.end(a)
    assert result_of(a).failure == "cancelled" and result_of(a).attempts == 1
    assert rig.core.lifecycle is Lifecycle.CLOSED and rig.loop.stopped and rig.launcher.closed


def test_a_retry_cancelled_by_terminate_keeps_its_last_result() -> None:
    rig = Rig(cpus=2, memory_mb=1000)
    a = rig.submit(Job(["tool"]).memory("600M").with_retries(2))
    other = rig.submit(Job(["other"]).memory("300M"))
    rig.launcher.running("j0").kill("memory", "over its m")
    rig.end(a)
    assert a.state is RunState.QUEUED and a.spec.memory == 1000 * MB  # waits for the other's memory
    rig.core.shut_down(True, "stopped by the test")
    result = result_of(a)
    assert a.state is RunState.CANCELLED and result.failure == "cancelled"
    assert result.error == "over its m; cancelled before it could run again: stopped by the test"
    rig.end(other)
    assert rig.core.lifecycle is Lifecycle.CLOSED


def test_a_move_the_states_do_not_allow_is_refused() -> None:
    rig = Rig()
    a = rig.submit(Job(["tool"]))
    rig.end(a)
    with pytest.raises(RuntimeError, match="cannot go from done to queued"):
        rig.core._move(a, RunState.QUEUED)


def test_a_memory_stop_during_a_kills_grace_kills_at_once() -> None:
    rig = Rig()
    a = rig.submit(Job(["tool"]).memory("100M"))
    run = a.run
    assert run is not None
    assert rig.kill(a, "killed: by the test", grace=30)
    assert a.state is RunState.STOPPING
    rig.core.stop(a, run, "used 300M, over its m", False)  # the monitor, during the 30 s grace
    assert rig.launcher.running("j0").kills == [("killed", 30), ("memory", 0)]
    rig.end(a)
    assert result_of(a).failure == "killed"  # the kill that started decides the failure


def test_a_killed_job_never_runs_again_and_a_second_kill_finds_it_killed() -> None:
    rig = Rig(cpus=1)
    a = rig.submit(Job(["tool"]).with_retries(3))
    assert rig.core.find(a.future, None) is a and rig.core.find(None, "j0") is a
    assert rig.kill(a, "killed: wrong input")
    assert not rig.kill(a, "killed: again")
    rig.end(a, returncode=-15)
    assert result_of(a).failure == "killed" and result_of(a).error == "killed: wrong input"
    assert result_of(a).attempts == 1 and len(rig.launcher.handles) == 1  # not retried
    assert rig.core.find(a.future, None) is None  # ended: nothing to kill


def test_a_kill_during_a_memory_stop_makes_it_killed_and_not_requeued() -> None:
    rig = Rig(cpus=2)
    a = rig.submit(Job(["tool"]).memory("100M").with_retries(2))
    assert a.run is not None
    rig.core.stop(a, a.run, "stopped and requeued: the machine ran short", True)
    assert a.state is RunState.STOPPING
    assert rig.kill(a, "killed: not needed")  # its end is not decided yet
    rig.end(a, returncode=-9)
    result = result_of(a)
    assert result.failure == "killed" and len(rig.launcher.handles) == 1
    assert result.error == "killed: not needed (it was being stopped: stopped and requeued: the machine ran short)"


def test_a_kill_during_a_timeouts_grace_keeps_the_timeout_and_stops_the_retry() -> None:
    rig = Rig(cpus=1)
    a = rig.submit(Job(["tool"]).with_retries(2))
    rig.launcher.running("j0").kill("timeout", "timed out after 1 s")  # the launcher's own timer
    assert not rig.kill(a, "killed: late")  # it was ending on its own
    rig.end(a, returncode=-15)
    assert result_of(a).failure == "timeout" and len(rig.launcher.handles) == 1


def test_a_killed_retry_waiting_in_the_queue_ends_with_its_last_result_marked_killed() -> None:
    rig = Rig(cpus=2, memory_mb=1000)
    a = rig.submit(Job(["tool"]).memory("600M").with_retries(1))
    b = rig.submit(Job(["other"]).memory("300M"))
    rig.launcher.running("j0").kill("memory", "used 700M, over its m")
    rig.end(a, returncode=-9, peak_mb=700)
    assert a.state is RunState.QUEUED and a.future.running()  # its 1200M retry waits for b
    assert rig.kill(a, "killed: give up")
    result = result_of(a)
    assert result.failure == "killed" and result.attempts == 1
    assert result.error == "used 700M, over its m; killed: give up (before it could run again)"
    assert a.state is RunState.CANCELLED and len(rig.scheduler_items()) == 0
    rig.end(b)
    assert len(rig.launcher.handles) == 2


def test_a_killed_queued_job_is_cancelled_and_the_next_one_starts_in_its_place() -> None:
    rig = Rig(cpus=1)
    a, b, c = (rig.submit(Job(["tool", str(i)])) for i in range(3))
    assert rig.kill(b, "killed on request")
    assert b.future.cancelled() and b.state is RunState.CANCELLED
    assert not rig.kill(b, "killed on request")
    c.future.cancel()  # its caller's cancel: a kill then stops nothing
    assert not rig.kill(c, "killed on request")
    rig.end(a)
    assert rig.states() == ["done", "cancelled", "cancelled"] and len(rig.launcher.handles) == 1


class RecordingTrace:
    """A trace that notes each event, and whether the job's future was resolved by then."""

    def __init__(self, items: List[Item]) -> None:
        self.items = items
        self.events: List[Tuple[str, str, bool]] = []

    def _note(self, event: str, job_id: str) -> None:
        (item,) = [i for i in self.items if i.job_id == job_id]
        self.events.append((event, job_id, item.future.done()))

    def started(self, job_id: str, *args: Any) -> None:
        self._note("started", job_id)

    def ended(self, job_id: str, *args: Any) -> None:
        self._note("ended", job_id)

    def cancelled(self, job_id: str, run: int, error: str, status: str = "cancelled") -> None:
        self._note(status, job_id)

    def idle(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_trace_has_its_last_word_on_a_cancelled_retry_before_its_future_resolves() -> None:
    items: List[Item] = []
    rig = Rig(cpus=2, memory_mb=1000, trace=RecordingTrace(items))
    rig.items = items
    a = rig.submit(Job(["tool"]).memory("600M").with_retries(2))
    rig.submit(Job(["other"]).memory("300M"))
    rig.launcher.running("j0").kill("memory", "over its m")
    rig.end(a)  # its retry waits for memory
    rig.core.shut_down(True, "stopped by the test")
    assert ("cancelled", "j0", False) in rig.core.trace.events  # type: ignore[union-attr]
    assert result_of(a).failure == "cancelled"


def test_the_trace_says_killed_for_a_job_killed_before_its_run_began() -> None:
    items: List[Item] = []
    rig = Rig(cpus=2, trace=RecordingTrace(items))
    rig.items = items
    a = rig.submit(Job(["tool"]).memory("600M").with_retries(1))
    rig.submit(Job(["holder"]).memory("300M"))
    b, c = (rig.submit(Job(["tool", str(i)]).memory("100M")) for i in range(2))
    assert rig.kill(b, "killed on request")  # queued, never ran
    assert c.future.cancel() and not rig.kill(c, "killed on request")  # its caller's cancel
    rig.launcher.running("j0").kill("memory", "over its m")
    rig.end(a)  # its retry (1000M) waits for the holder
    assert a.state is RunState.QUEUED
    assert rig.kill(a, "killed: enough")
    events = rig.core.trace.events  # type: ignore[union-attr]
    # A retry's result comes after the trace's word; a job that never ran is cancelled by the
    # kill's caller first (as cancel() is). A caller's own cancel stays cancelled.
    assert ("killed", "j2", True) in events and ("killed", "j0", False) in events
    assert ("cancelled", "j3", True) in events


# -- a launcher that defers starts (Dask's): futures pending until the run begins there -----------


def test_a_handed_job_is_pending_until_it_begins_and_cancel_takes_it_back() -> None:
    rig = Rig(defers_start=True)
    a, b = rig.submit(Job(["tool"])), rig.submit(Job(["other"]))
    assert a.state is b.state is RunState.RUNNING and not a.future.running() and not b.future.running()
    rig.launcher.on_begin("j0")
    assert a.future.running() and not a.future.cancel()
    assert b.future.cancel()  # (the executor's future then asks the loop to take it back)
    rig.core.take_back("j1")
    assert rig.launcher.running("j1").killed == ("cancelled", "cancelled before it started")
    rig.end(b)
    assert b.state is RunState.DONE and b.future.cancelled() and b.future.usage is None
    assert concurrent.futures.wait([b.future], timeout=0).done == {b.future}  # its waiters woken
    rig.end(a)
    assert result_of(a).success and rig.states() == ["done", "done"]


def test_a_handed_job_that_ended_before_it_began_is_running_for_its_retry() -> None:
    """Its end decides: a cancel() after it fails, as for a running job (the retry's end, or a
    terminate, resolves the future; a cancelled one would refuse the result)."""
    rig = Rig(cpus=1, defers_start=True)
    a = rig.submit(Job(["tool"]).with_retries(1))
    rig.launcher.running("j0").kill("error", "its Dask worker left")
    rig.end(a)
    assert a.state is RunState.RUNNING and a.runs == 2 and a.future.running()  # its retry, handed
    assert not a.future.cancel()
    rig.core.shut_down(True, "stopped by the test")
    rig.end(a)
    assert result_of(a).failure == "cancelled" and result_of(a).attempts == 2


def test_shutdown_with_cancel_futures_takes_back_the_handed_jobs_not_begun() -> None:
    rig = Rig(defers_start=True)
    a, b = rig.submit(Job(["tool"])), rig.submit(Job(["other"]))
    rig.launcher.on_begin("j1")
    rig.core.advance(Lifecycle.SHUT_DOWN)
    rig.core.shut_down(True, None)
    # Cancelled on the delivery thread (callbacks never run on the loop), then taken back.
    assert concurrent.futures.wait([a.future], timeout=10).done == {a.future}
    rig.core.take_back("j0")  # what the executor's future asks of the loop once cancelled
    assert a.future.cancelled() and rig.launcher.running("j0").killed == ("cancelled", "cancelled before it started")
    assert rig.launcher.running("j1").killed is None  # begun: it runs on
    rig.end(a)
    rig.end(b)
    assert result_of(b).success and rig.core.lifecycle is Lifecycle.CLOSED

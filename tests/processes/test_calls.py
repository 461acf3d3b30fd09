"""Python calls in reused worker processes: the ProcessPoolExecutor contract, per-call
measurement, faults that fail one call alone, and no worker left behind."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, List, Tuple

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import callees
from support.helpers import processes_with, unique_sleep, wait_gone

import mpmsub
from mpmsub import (
    Call,
    CallCancelledError,
    CallError,
    CallPicklingError,
    CallTimeoutError,
    MemoryAwareExecutor,
    MemoryLimitError,
    RemoteTraceback,
    WorkerDiedError,
)
from mpmsub._call import chunks

HERE = Path(__file__).resolve().parent.parent / "support"  # the programs and callees the tests run
LINUX = sys.platform.startswith("linux")


def alive(pid: int) -> bool:
    """The process exists, a zombie included (a worker never reaped is a leak too)."""
    return psutil.pid_exists(pid)


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def workers_of(ex: MemoryAwareExecutor) -> List[int]:
    """The pids of the executor's workers (read from the loop thread's set: copied, retried)."""
    for _ in range(100):
        try:
            return [w.pid for w in list(ex._launcher.workers._workers)]  # type: ignore[attr-defined]
        except RuntimeError:  # the set changed while copied
            continue
    raise AssertionError("could not read the worker set")


def wait_seen(marker: str, timeout: float = 10.0) -> None:
    """Wait until a process with `marker` on its command line runs (so its absence later means
    it was killed, not that it never started)."""
    deadline = time.monotonic() + timeout
    while not processes_with(marker):
        assert time.monotonic() < deadline, f"no process with {marker} started"
        time.sleep(0.02)


# -- the ProcessPoolExecutor contract ----------------------------------------------------------------


def test_a_process_pool_script_runs_unchanged_with_the_class_swapped() -> None:
    def run(executor: str) -> str:
        done = subprocess.run(
            [sys.executable, str(HERE / "ppe_script.py"), executor],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=HERE,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    expected = run("concurrent.futures:ProcessPoolExecutor")
    assert "traceback attached: True" in expected
    assert run("mpmsub:MemoryAwareExecutor") == expected


def test_submit_returns_the_value_and_usage() -> None:
    with MemoryAwareExecutor(max_workers=2) as ex:
        future = ex.submit(callees.add, 2, y=3)
        assert future.result(timeout=60) == 5
        usage = future.usage
        assert usage is not None and usage.success and usage.value == 5
        assert usage.cmd == ["add(2, y=3)"] and usage.returncode is None
        assert usage.memory_used > 1 and usage.runtime >= 0 and usage.attempts == 1
        assert usage.end_time >= usage.start_time
        command = ex.submit(["echo", "hi"])
        assert command.result(timeout=60) is command.usage  # a command's result is its usage


def test_an_exception_is_reraised_with_the_workers_traceback() -> None:
    with MemoryAwareExecutor(max_workers=1) as ex:
        future = ex.submit(callees.fail, "no good")
        with pytest.raises(ValueError, match="no good") as info:
            future.result(timeout=60)
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "callees.py" in str(cause) and "in fail" in str(cause)
        assert future.usage is not None and future.usage.failure == "raised"
        assert future.usage.error == "raised ValueError: no good"
        assert ex.submit(callees.square, 3).result(timeout=60) == 9  # the worker goes on


def test_map_is_ordered_batches_and_times_out_lazily() -> None:
    with MemoryAwareExecutor(max_workers=2) as ex:
        assert list(ex.map(callees.add, range(50), range(50), chunksize=7)) == [2 * i for i in range(50)]
        assert list(ex.map(callees.square, [])) == []
        list(ex.map(callees.square, range(4)))  # both workers up: the timeout is not their start
        results = ex.map(callees.sleep, [0.0, 30.0], timeout=1.0)
        assert next(results) == 0.0
        with pytest.raises(FutureTimeout):
            next(results)
        ex.terminate()  # the 30 s call is not waited for


def test_map_cancels_the_chunks_not_reached_when_closed_early() -> None:
    with MemoryAwareExecutor(max_workers=1) as ex:
        results = ex.map(callees.sleep, [0.3] + [1.5] * 5)
        assert next(results) == 0.3
        started = time.monotonic()
        results.close()  # the chunk started meanwhile finishes; the queued ones are cancelled
    # One 1.5 s chunk at most ran after the close, not all five.
    assert time.monotonic() - started < 3.5, "queued chunks ran after the iteration was closed"


@given(
    st.lists(st.lists(st.integers(), max_size=30), min_size=1, max_size=3),
    st.integers(min_value=1, max_value=12),
)
def test_chunks_regroup_zip_exactly(iterables: List[List[int]], size: int) -> None:
    parts = list(chunks(iterables, size))
    assert [args for part in parts for args in part] == list(zip(*iterables))
    assert all(len(part) == size for part in parts[:-1])
    assert all(1 <= len(part) <= size for part in parts)


def test_workers_are_reused_and_replaced_after_max_tasks_per_child() -> None:
    with MemoryAwareExecutor(max_workers=1) as ex:
        assert len({ex.submit(callees.pid).result(timeout=60) for _ in range(6)}) == 1
    with MemoryAwareExecutor(max_workers=1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(callees.pid).result(timeout=60) for _ in range(6)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]
    assert len(set(pids)) == 3


def test_initializer_runs_in_every_worker_and_a_failing_one_fails_the_calls() -> None:
    with MemoryAwareExecutor(max_workers=2, initializer=callees.initialize, initargs=("ready",)) as ex:
        assert set(ex.map(callees.initialized, range(4))) == {"ready"}
    with MemoryAwareExecutor(max_workers=1, initializer=callees.broken_initializer) as ex:
        future = ex.submit(callees.square, 2)
        with pytest.raises(WorkerDiedError, match="could not be prepared: RuntimeError: the initializer fails") as info:
            future.result(timeout=60)
        assert isinstance(info.value, BrokenProcessPool)  # what ProcessPoolExecutor code catches
        # Later calls fail at once, without starting a worker each that would fail the same way.
        later = [ex.submit(callees.square, i) for i in range(20)]
        for f in later:
            with pytest.raises(WorkerDiedError, match="the initializer fails"):
                f.result(timeout=60)
        assert workers_of(ex) == []


def test_a_calls_timeout_does_not_count_its_workers_start() -> None:
    with MemoryAwareExecutor(max_workers=1, initializer=callees.sleep, initargs=(1.5,)) as ex:
        assert ex.submit(Call(callees.square, 3).with_timeout(1.0)).result(timeout=60) == 9


def test_pool_options_are_checked_at_once() -> None:
    import multiprocessing

    with pytest.raises(ValueError, match="max_tasks_per_child 0"):
        MemoryAwareExecutor(max_tasks_per_child=0)
    with pytest.raises(TypeError, match="initargs must be a tuple"):
        MemoryAwareExecutor(initializer=callees.initialize, initargs="x")  # type: ignore[arg-type]
    if "fork" in multiprocessing.get_all_start_methods():
        with pytest.raises(ValueError, match="start method 'fork'"):
            MemoryAwareExecutor(mp_context=multiprocessing.get_context("fork"))
    MemoryAwareExecutor(mp_context=multiprocessing.get_context("spawn")).shutdown()
    with MemoryAwareExecutor(max_workers=1) as ex:
        with pytest.raises(ValueError, match="chunksize 0"):
            ex.map(callees.square, [1], chunksize=0)
        with pytest.raises(TypeError, match="expected a function"):
            ex.map(42, [1])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="'lots'"):
            ex.map(callees.square, [1], memory="lots")
        with pytest.raises(TypeError, match="give the arguments to Call"):
            ex.submit(Call(callees.square, 1), 2)
        with pytest.raises(ValueError, match="can never run"):
            ex.submit(Call(callees.square, 1).cpu(64))
    with pytest.raises(TypeError, match="expected a function"):
        Call("square")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strict memory needs"):
        Call(callees.square, 1).strict_memory().spec()


# -- what cannot be pickled ------------------------------------------------------------------------


def test_what_cannot_be_pickled_fails_its_own_future_naming_it() -> None:
    lock = threading.Lock()
    with MemoryAwareExecutor(max_workers=1) as ex:
        cases: List[Tuple[Any, str]] = [
            (ex.submit(lambda: 1), "the function '.*<lambda>'.*not lambdas or nested functions"),
            (ex.submit(callees.add, lock), "argument 0 \\(lock"),
            (ex.submit(callees.add, 1, y=lock), "keyword argument 'y' \\(lock"),
            (ex.submit(callees.generator), "its return value \\(builtins.generator\\) could not be pickled"),
            (ex.submit(callees.returns_unloadable), "could not be unpickled here: RuntimeError: this object refuses"),
            (ex.submit(callees.add, callees.Unloadable()), "worker could not unpickle the call"),
        ]
        for future, message in cases:
            with pytest.raises(CallPicklingError, match=message) as info:
                future.result(timeout=60)
            assert isinstance(info.value, pickle.PicklingError)  # as ProcessPoolExecutor's scripts expect
            assert future.usage is not None and future.usage.failure == "pickle"
        with pytest.raises(CallPicklingError, match="item 1 of the iterables"):
            list(ex.map(callees.square, [1, lock]))
        with pytest.raises(CallPicklingError, match="raised OddError: odd 1 2, which could not be pickled back"):
            ex.submit(callees.raise_odd).result(timeout=60)
        assert ex.submit(callees.square, 5).result(timeout=60) == 25


# -- measurement ------------------------------------------------------------------------------------


@pytest.mark.skipif(not LINUX, reason="the per-call peak reset (/proc/self/clear_refs) is Linux's")
def test_each_calls_peak_is_its_own_in_a_reused_worker() -> None:
    with MemoryAwareExecutor(max_workers=1, memory="2G") as ex:
        big = ex.submit(callees.allocate, 400)
        small = ex.submit(callees.allocate, 100)
        tiny = ex.submit(callees.square, 1)
        assert big.result(timeout=60) == small.result(timeout=60)  # one worker ran both
        tiny.result(timeout=60)
    assert big.usage is not None and small.usage is not None and tiny.usage is not None
    base = tiny.usage.memory_used  # the worker's interpreter alone
    assert 400 <= big.usage.memory_used <= 400 + base + 20
    assert 100 <= small.usage.memory_used <= 100 + base + 20
    assert small.usage.memory_used < 0.5 * big.usage.memory_used


def test_cpu_time_is_measured_per_call() -> None:
    with MemoryAwareExecutor(max_workers=1) as ex:
        busy = ex.submit(sum, range(10**7))
        idle = ex.submit(callees.sleep, 0.3)
        busy.result(timeout=60), idle.result(timeout=60)
    assert busy.usage is not None and idle.usage is not None
    assert busy.usage.cpu_used > 0.05
    assert idle.usage.cpu_used < 0.1 and idle.usage.runtime >= 0.3


# -- faults: the call fails alone, the executor goes on --------------------------------------------


def test_a_crashing_call_and_a_memory_liar_fail_alone() -> None:
    with MemoryAwareExecutor(cpus=2, memory="2G") as ex:
        crash = ex.submit(callees.segfault)
        abort = ex.submit(callees.abort)
        killed = ex.submit(callees.kill_self)
        exited = ex.submit(callees.exit_hard, 3)
        liar = ex.submit(Call(callees.allocate_slowly, 400, 2.0).memory("100M").strict_memory())
        rest = [ex.submit(callees.square, i) for i in range(30)]
        with pytest.raises(WorkerDiedError, match="its worker process was killed by signal SIGSEGV"):
            crash.result(timeout=60)
        with pytest.raises(WorkerDiedError, match="signal SIGABRT"):
            abort.result(timeout=60)
        with pytest.raises(WorkerDiedError, match="signal SIGKILL"):
            killed.result(timeout=60)
        with pytest.raises(WorkerDiedError, match="its worker process exited with status 3"):
            exited.result(timeout=60)
        with pytest.raises(MemoryLimitError, match="of the 100M it declared") as info:
            liar.result(timeout=60)
        assert info.value.result is liar.usage and liar.usage is not None
        assert liar.usage.failure == "memory" and liar.usage.memory_used > 100
        assert [f.result(timeout=60) for f in rest] == [i * i for i in range(30)]
        assert ex.submit(callees.square, 7).result(timeout=60) == 49


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "waiter-thread"])
def test_a_worker_dying_with_a_forked_child_holding_its_pipe_ends_its_call(
    pidfd: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)  # as on macOS or an old kernel
    pid_file = tmp_path / "child.pid"
    with MemoryAwareExecutor(max_workers=1) as ex:
        future = ex.submit(callees.fork_and_die, str(pid_file))
        with pytest.raises(WorkerDiedError, match="exited with status 7"):
            future.result(timeout=20)
        assert ex.submit(callees.square, 4).result(timeout=60) == 16
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the forked child outlived the worker's end"
        time.sleep(0.05)


def test_a_call_pushing_the_budget_over_is_stopped() -> None:
    with MemoryAwareExecutor(cpus=2, memory="300M", memory_reserve=0) as ex:
        hog = ex.submit(Call(callees.allocate_slowly, 600, 3.0).memory("100M"))
        with pytest.raises(MemoryLimitError, match="300M budget"):
            hog.result(timeout=60)
        assert ex.submit(callees.square, 3).result(timeout=60) == 9


def test_a_call_past_its_timeout_is_killed_with_what_it_started() -> None:
    marker = unique_sleep()
    with MemoryAwareExecutor(max_workers=2, kill_grace=0.5) as ex:
        sleeper = ex.submit(Call(callees.sleep, 60).with_timeout(0.5))
        parent = ex.submit(Call(callees.sleep_in_child, 60, marker).with_timeout(1.0))
        started = time.monotonic()
        wait_seen(marker)
        with pytest.raises(CallTimeoutError, match=r"timed out after 0\.5 s"):
            sleeper.result(timeout=30)
        with pytest.raises(CallTimeoutError, match="timed out after 1 s"):
            parent.result(timeout=30)
        assert time.monotonic() - started < 10
        assert not wait_gone(marker), "the program the call started outlived its timeout"
        assert ex.submit(callees.square, 2).result(timeout=60) == 4


def test_a_failed_call_is_retried() -> None:
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"mpmsub-flaky-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with MemoryAwareExecutor(max_workers=1) as ex:
            future = ex.submit(Call(callees.flaky, str(marker)).with_retries(1))
            assert future.result(timeout=60) == "second try"
            assert future.usage is not None and future.usage.attempts == 2
    finally:
        marker.unlink(missing_ok=True)


def test_calls_and_commands_share_one_budget() -> None:
    """Each reserves 250M of a 600M budget: at most two run at once, whichever kind they are
    (with 4 CPUs, only the memory holds them back)."""
    code = "import time; b = bytearray(150 * 2**20); time.sleep(0.4)"
    with MemoryAwareExecutor(cpus=4, memory="600M") as ex:
        futures = []
        for i in range(8):
            if i % 2:
                futures.append(ex.submit(Call(callees.allocate, 150, 0.4).memory("250M")))
            else:
                futures.append(ex.submit(mpmsub.Job([sys.executable, "-c", code]).memory("250M")))
        results = [f.usage for f in futures if f.result(timeout=120) is not None]
    assert all(r is not None and r.success for r in results)
    events = sorted([(r.start_time, 1) for r in results] + [(r.end_time, -1) for r in results])  # type: ignore[union-attr]
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2, f"{peak} jobs of 250M ran at once in a 600M budget"


# -- shutdown: no worker left behind ---------------------------------------------------------------


def test_leaving_the_with_block_ends_every_worker() -> None:
    with MemoryAwareExecutor(max_workers=2) as ex:
        list(ex.map(callees.square, range(10)))
        pids = workers_of(ex)
    assert pids and not any(alive(p) for p in pids)


def test_an_exception_in_the_with_block_kills_running_calls() -> None:
    marker = unique_sleep()
    with pytest.raises(KeyError), MemoryAwareExecutor(max_workers=1) as ex:
        running = ex.submit(callees.sleep_in_child, 60, marker)
        queued = ex.submit(callees.square, 2)
        wait_seen(marker)
        pids = workers_of(ex)
        raise KeyError("boom")
    with pytest.raises(CallCancelledError, match="KeyError"):
        running.result(timeout=10)
    assert queued.cancelled()
    assert pids and not any(alive(p) for p in pids)
    assert not wait_gone(marker)


def test_cancel_futures_cancels_queued_calls() -> None:
    ex = MemoryAwareExecutor(max_workers=1)
    first = ex.submit(callees.sleep, 0.5)
    queued = [ex.submit(callees.square, i) for i in range(5)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.result() == 0.5
    assert all(f.cancelled() for f in queued)


def _run_driver(body: str, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            sys.path.insert(0, {str(HERE)!r})
            import callees, mpmsub

            if __name__ == "__main__":
            """
        )
        + textwrap.indent(textwrap.dedent(body), "    ")
    )
    return subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )


def _worker_pids(driver: subprocess.Popen[str]) -> List[int]:
    line = driver.stdout.readline() if driver.stdout else ""
    return [int(p) for p in line.split()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_ctrl_c_or_kill_9_of_the_driver_leaves_no_worker(sig: int, tmp_path: Path) -> None:
    marker = unique_sleep()
    driver = _run_driver(
        f"""
        ex = mpmsub.MemoryAwareExecutor(max_workers=2)
        pids = set(ex.map(callees.pid, range(20))) | set(ex.map(callees.parent, range(4)))  # and the zygote
        futures = [ex.submit(callees.sleep_in_child, 60, {marker!r}) for _ in range(2)]
        print(*pids, flush=True)
        futures[0].result()
        """,
        tmp_path,
    )
    try:
        pids = _worker_pids(driver)
        assert pids
        wait_seen(marker)
        time.sleep(0.2)  # the watchman hears of sessions at the monitor's next tick
        driver.send_signal(sig)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids), "a worker or the zygote outlived its driver"
        assert not wait_gone(marker, timeout=5), "a call's program outlived its driver"
    finally:
        driver.kill()
        driver.communicate()  # and close its pipes


def test_a_script_without_a_main_guard_fails_its_calls_instead_of_multiplying(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport callees, mpmsub\n"
        "with mpmsub.MemoryAwareExecutor(max_workers=1) as ex:\n"
        "    print(ex.submit(callees.square, 3).result())\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert "WorkerDiedError" in done.stderr and "could not be prepared" in done.stderr
    assert "if __name__ == '__main__'" in done.stderr


def test_as_completed_over_calls_and_commands() -> None:
    with MemoryAwareExecutor(max_workers=2) as ex:
        futures = [ex.submit(callees.square, i) for i in range(10)] + [ex.submit(["true"])]
        done = list(as_completed(futures, timeout=60))
    assert len(done) == 11


def test_process_pool_executor_and_ours_agree_on_map_results() -> None:
    import multiprocessing

    items = list(range(100))
    spawn = multiprocessing.get_context("spawn")  # this process has threads: no fork
    with ProcessPoolExecutor(2, mp_context=spawn) as theirs, MemoryAwareExecutor(max_workers=2) as ours:
        assert list(ours.map(callees.add, items, items, chunksize=9)) == list(
            theirs.map(callees.add, items, items, chunksize=9)
        )


# -- the zygote: workers forked from one prepared process --------------------------------------------

needs_zygote = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"), reason="workers fork from a zygote on Linux"
)


@needs_zygote
def test_workers_are_forked_from_one_zygote_which_ends_with_the_executor() -> None:
    with MemoryAwareExecutor(max_workers=2) as ex:
        slow = [ex.submit(callees.sleep, 0.3) for _ in range(2)]  # both workers busy at once
        parents = {ex.submit(callees.parent).result(timeout=60) for _ in range(4)}
        pids = set(ex.map(callees.pid, range(8)))
        [f.result(timeout=60) for f in slow]
        assert len(parents) == 1 and os.getpid() not in parents
        (zygote,) = parents
        assert "--zygote" in psutil.Process(zygote).cmdline()
        assert psutil.Process(zygote).ppid() == os.getpid()
        assert all(psutil.Process(p).ppid() == zygote for p in pids)
    assert not alive(zygote) and not any(alive(p) for p in pids)


@pytest.mark.parametrize("how", ["MPMSUB_ZYGOTE=0", "spawn context"])
def test_without_a_zygote_workers_are_fresh_interpreters(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing

    context = None
    if how == "spawn context":
        context = multiprocessing.get_context("spawn")
    else:
        monkeypatch.setenv("MPMSUB_ZYGOTE", "0")
    with MemoryAwareExecutor(max_workers=2, mp_context=context, initializer=callees.initialize, initargs=("x",)) as ex:
        assert set(ex.map(callees.parent, range(6))) == {os.getpid()}
        assert ex.submit(callees.initialized).result(timeout=60) == "x"


@needs_zygote
def test_a_killed_zygote_fails_the_calls_it_ran_and_a_new_one_serves_the_next(tmp_path: Path) -> None:
    marker = tmp_path / "parent"
    with MemoryAwareExecutor(max_workers=2, kill_grace=0.5) as ex:
        running = ex.submit(callees.parent_then_sleep, str(marker))
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        zygote = int(marker.read_text())
        assert zygote != os.getpid()
        os.kill(zygote, signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match=rf"zygote\) {zygote} exited, status -9"):
            running.result(timeout=30)
        assert running.usage is not None and running.usage.runtime < 30
        again = ex.submit(callees.parent).result(timeout=60)
        assert again not in (zygote, os.getpid())
        assert ex.submit(callees.square, 5).result(timeout=60) == 25


@needs_zygote
def test_a_call_killed_while_the_zygote_starts_ends_at_once() -> None:
    ex = MemoryAwareExecutor(max_workers=2)
    futures = [ex.submit(callees.square, i) for i in range(2)]
    ex.terminate("stopped at once")
    for future in futures:
        with pytest.raises(CallError):  # cancelled before or while it ran
            future.result(timeout=10)
    ex.shutdown()
    zygotes = [p for p in psutil.Process().children() if "--zygote" in " ".join(p.cmdline())]
    assert not zygotes


def _script(tmp_path: Path, top: str, main: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(
        f"import os, sys, threading, time\nsys.path.insert(0, {str(HERE)!r})\nimport callees, mpmsub\n"
        + textwrap.dedent(top)
        + "\nif __name__ == '__main__':\n"
        + textwrap.indent(textwrap.dedent(main), "    ")
    )
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)


@needs_zygote
def test_a_main_module_that_starts_a_thread_is_not_forked_from(tmp_path: Path) -> None:
    done = _script(
        tmp_path,
        "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n",
        """
        with mpmsub.MemoryAwareExecutor(max_workers=2) as ex:
            print(sorted(set(ex.map(callees.parent, range(6)))) == [os.getpid()], sum(ex.map(callees.square, range(5))))
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "True 30\n"


def test_what_a_call_printed_without_flushing_is_written_when_its_worker_ends(tmp_path: Path) -> None:
    done = _script(
        tmp_path,
        "def say(word):\n    print(word, end=' ')\n    return word\n",
        """
        with mpmsub.MemoryAwareExecutor(max_workers=1) as ex:
            ex.submit(say, "unflushed").result()
        print("after")
        """,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == ["after", "unflushed"]


def test_a_call_first_started_at_exit_finds_the_main_module(tmp_path: Path) -> None:
    """A script that submits and ends without shutdown() has its calls run at exit, when the
    interpreter has already removed __main__.__file__: the workers still import the script."""
    done = _script(
        tmp_path,
        "def double(x):\n    return 2 * x\n",
        """
        ex = mpmsub.MemoryAwareExecutor(max_workers=1)
        ex.submit(double, 21).add_done_callback(lambda f: print(f.exception() or f.result(), flush=True))
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"


def test_a_main_module_that_creates_an_executor_unguarded_fails_its_calls_and_runs_nothing_twice(
    tmp_path: Path,
) -> None:
    """Its workers import it: the executor it creates there would run its jobs a second time."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport callees, mpmsub\n"
        "ex = mpmsub.MemoryAwareExecutor(max_workers=1)\n"
        "print(ex.submit(['echo', 'job ran']).result().stdout, end='', flush=True)\n"
        "future = ex.submit(pow, 2, 10)\n"
        "print(type(future.exception()).__name__, flush=True)\n"
        "ex.shutdown()\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "job ran\nWorkerDiedError\n"
    assert "creates an executor itself" in done.stderr and "if __name__ == '__main__'" in done.stderr


@needs_zygote
def test_a_main_module_importing_numpy_is_still_forked_from(tmp_path: Path) -> None:
    """numpy's OpenBLAS starts an idle pool of threads at import: threads of C, made for fork,
    unlike threads started from Python."""
    pytest.importorskip("numpy")
    done = _script(
        tmp_path,
        "import numpy\n",
        """
        with mpmsub.MemoryAwareExecutor(max_workers=2) as ex:
            parents = set(ex.map(callees.parent, range(6)))
            print(len(parents) == 1 and os.getpid() not in parents, ex.submit(callees.square, 4).result())
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "True 16\n", done.stderr


@needs_zygote
def test_a_worker_gets_the_environment_of_the_moment_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    with MemoryAwareExecutor(max_workers=1, max_tasks_per_child=1) as ex:
        assert ex.submit(os.getenv, "MPMSUB_TEST_LATER").result(timeout=60) is None
        monkeypatch.setenv("MPMSUB_TEST_LATER", "set after the zygote started")
        assert ex.submit(os.getenv, "MPMSUB_TEST_LATER").result(timeout=60) == "set after the zygote started"
        monkeypatch.delenv("MPMSUB_TEST_LATER")
        assert ex.submit(os.getenv, "MPMSUB_TEST_LATER").result(timeout=60) is None


def test_a_main_module_that_ignores_sigchld_still_has_its_calls_exit_statuses(tmp_path: Path) -> None:
    done = _script(
        tmp_path,
        "import signal\nsignal.signal(signal.SIGCHLD, signal.SIG_IGN)\n",
        """
        with mpmsub.MemoryAwareExecutor(max_workers=1) as ex:
            future = ex.submit(callees.exit_hard, 3)
            print(future.exception(timeout=60), flush=True)
            print(ex.submit(callees.square, 3).result(timeout=60))
        """,
    )
    assert done.returncode == 0, done.stderr
    assert "its worker process exited with status 3" in done.stdout and done.stdout.endswith("\n9\n")


def test_what_the_main_module_starts_as_it_is_imported_ends_with_the_executor(tmp_path: Path) -> None:
    marker = unique_sleep()
    done = _script(
        tmp_path,
        f"import subprocess\nif __name__ != '__main__':\n    subprocess.Popen(['sleep', {marker!r}])\n",
        f"""
        from helpers import processes_with, wait_gone
        with mpmsub.MemoryAwareExecutor(max_workers=1) as ex:
            print(ex.submit(callees.square, 5).result(timeout=60), bool(processes_with({marker!r})))
        # Looked at before this process ends (the watchman would kill what is left then).
        print(wait_gone({marker!r}, timeout=5) == [])
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "25 True\nTrue\n", "what the zygote's main module started outlived the executor"


@needs_zygote
def test_calls_run_with_the_executors_standard_output_and_error_closed(tmp_path: Path) -> None:
    """The zygote's socket and the workers' pipes must not take fds 1 or 2, which are then free:
    what the zygote or a worker writes to its standard streams would go into them."""
    done = _script(
        tmp_path,
        "if __name__ != '__main__':\n"
        "    try:\n        os.write(2, b'noise at import\\n')\n    except OSError:\n        pass\n",
        """
        out = os.dup(1)
        with mpmsub.MemoryAwareExecutor(max_workers=2) as ex:
            os.close(1)  # now: the executor's own files took the low numbers before
            os.close(2)
            parents = set(ex.map(callees.parent, range(6)))
            total = sum(ex.map(callees.square, range(20)))
        os.write(out, f"{total} {len(parents) == 1 and os.getpid() not in parents}\\n".encode())
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2470 True\n"


def test_a_workers_threads_finish_before_it_ends(tmp_path: Path) -> None:
    marker = tmp_path / "written by a thread"
    with MemoryAwareExecutor(max_workers=1) as ex:
        ex.submit(callees.write_later, str(marker), 0.3).result(timeout=60)
    assert marker.read_text() == "done"


@needs_zygote
def test_calls_submitted_as_the_zygote_dies_get_a_new_one() -> None:
    with MemoryAwareExecutor(max_workers=2, max_tasks_per_child=1) as ex:
        zygote = ex.submit(callees.parent).result(timeout=60)
        os.kill(zygote, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while running(zygote):  # dead, perhaps not reaped: the executor may not have heard of it yet
            assert time.monotonic() < deadline
            time.sleep(0.001)
        futures = [ex.submit(callees.parent) for _ in range(4)]  # each needs a new worker
        parents = {f.result(timeout=60) for f in futures}
        assert zygote not in parents and os.getpid() not in parents


@needs_zygote
def test_a_stopped_zygote_is_given_up_and_the_call_runs_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpmsub._launch import zygote as _zygote

    monkeypatch.setattr(_zygote, "_REPLY_WAIT", 0.5)
    with MemoryAwareExecutor(max_workers=1, max_tasks_per_child=1) as ex:
        zygote = ex.submit(callees.parent).result(timeout=60)
        os.kill(zygote, signal.SIGSTOP)
        try:
            started = time.monotonic()
            again = ex.submit(callees.parent).result(timeout=30)  # waits for a fork that never comes
            assert again != zygote and time.monotonic() - started < 20
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(zygote, signal.SIGCONT)
    assert not alive(zygote)


@needs_zygote
def test_an_idle_worker_of_a_dead_zygote_is_not_given_the_next_call() -> None:
    with MemoryAwareExecutor(max_workers=1) as ex:
        zygote = ex.submit(callees.parent).result(timeout=60)  # its worker stays, idle
        os.kill(zygote, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while running(zygote):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert ex.submit(callees.square, 6).result(timeout=60) == 36


@needs_zygote
def test_a_zygote_that_dies_before_it_is_ready_leaves_fresh_interpreters(tmp_path: Path) -> None:
    marker = tmp_path / "imported once"
    done = _script(
        tmp_path,
        # The first process to import it as a worker's main module (the zygote) dies there.
        f"if __name__ != '__main__' and not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close()\n    os._exit(3)\n",
        """
        with mpmsub.MemoryAwareExecutor(max_workers=2) as ex:
            print(set(ex.map(callees.parent, range(4))) == {os.getpid()}, ex.submit(callees.square, 3).result())
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "True 9\n"
    assert marker.exists()


@needs_zygote
def test_zygotes_lost_one_after_another_leave_fresh_interpreters(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpmsub._launch import pool as _workers

    monkeypatch.setattr(_workers, "_ZYGOTE_LOSSES", 1)  # the first loss is enough here
    with MemoryAwareExecutor(max_workers=1, max_tasks_per_child=1) as ex:
        zygote = ex.submit(callees.parent).result(timeout=60)
        os.kill(zygote, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(zygote):  # reaped: the executor has seen it go
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert ex.submit(callees.parent).result(timeout=60) == os.getpid()

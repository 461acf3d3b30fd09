"""Engine robustness: what a review of the event loop, the launcher and the futures found."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import pytest
from support.helpers import unique_sleep, wait_gone

import mpmsub
from mpmsub import MemoryAwareExecutor

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mpmsub.__file__).parent.parent), *sys.path])}


def test_a_timeout_of_weeks_does_not_break_the_loop() -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G", kill_grace=30 * 86400) as ex:
        long = ex.submit(mpmsub.Job(["echo", "ok"]).with_timeout("30d"))
        assert long.result(timeout=10).success
        assert ex.submit(["echo", "after"]).result(timeout=10).stdout == "after\n"


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"cmd": ["echo", "a\0b"]}, "contains a NUL byte"),
        ({"cmd": ["echo"], "env": {"X": "a\0b"}}, "contains a NUL byte"),
        ({"cmd": ["echo"], "cwd": "/tmp\0x"}, "contains a NUL byte"),
        ({"pipeline": [["echo", "x"], ["cat", "\0"]]}, "contains a NUL byte"),
    ],
)
def test_nul_bytes_are_refused_at_submit(job: object, message: str) -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex, pytest.raises(ValueError, match=message):
        ex.submit(job)


def test_a_foreign_reaper_fails_the_job_instead_of_hanging(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent("""
        import signal, mpmsub
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps every child at once
        with mpmsub.MemoryAwareExecutor(cpus=1, memory="1G") as ex:
            r = ex.submit(["sh", "-c", "sleep 0.2"]).result(timeout=20)
        print(r.failure, "|", r.error)
    """)
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("error | its exit status was collected by another part of this program")


def test_a_slow_done_callback_does_not_stall_timeouts_or_dispatch() -> None:
    with MemoryAwareExecutor(cpus=2, memory="1G") as ex:
        first = ex.submit(["echo", "first"])
        first.add_done_callback(lambda f: time.sleep(2))
        first.result(timeout=10)
        t0 = time.monotonic()
        timed = ex.submit(mpmsub.Job(["sleep", "30"]).with_timeout(0.3))
        quick = ex.submit(["echo", "quick"])
        done, _ = wait([timed, quick], timeout=10)
        assert len(done) == 2 and time.monotonic() - t0 < 1.5
        assert timed.result().timed_out and quick.result().success


def test_a_done_callback_may_wait_for_another_future_of_the_executor() -> None:
    seen = []
    with MemoryAwareExecutor(cpus=2, memory="1G") as ex:
        other = ex.submit(["sleep", "0.3"])
        first = ex.submit(["echo", "x"])
        first.add_done_callback(lambda f: seen.append(other.result(timeout=10).success))
        first.result(timeout=10)
    assert seen == [True]


def test_a_callback_that_raises_systemexit_does_not_stop_the_executor() -> None:
    def bad(_: object) -> None:
        raise SystemExit(3)

    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        first = ex.submit(["echo", "x"])
        first.add_done_callback(bad)
        first.result(timeout=10)
        assert ex.submit(["echo", "still"]).result(timeout=10).stdout == "still\n"


def test_finished_jobs_with_long_timeouts_are_not_kept_alive_by_their_timers() -> None:
    with MemoryAwareExecutor(cpus=2, memory="1G") as ex:
        # 300 jobs: past the 256 cancelled timers from which the heap is compacted
        futures = [ex.submit(mpmsub.Job(["true"]).with_timeout("1h")) for _ in range(300)]
        assert all(f.result(timeout=60).success for f in futures)
        live_timers = sum(not entry[2].cancelled for entry in ex._loop._timers)
        assert live_timers == 0
        assert len(ex._loop._timers) < 300  # cancelled entries are compacted away


def test_map_of_a_command_is_refused_clearly() -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex, pytest.raises(TypeError, match="submit each command"):
        ex.map(["echo"], [["x"]])


def test_threads_waiting_on_queued_futures_are_woken_by_cancel_futures() -> None:
    ex = MemoryAwareExecutor(cpus=1, memory="1G")
    blocker = ex.submit(["sleep", "0.5"])
    queued = ex.submit(["sleep", "5"])
    woken = threading.Event()

    def waiter() -> None:
        wait([queued], timeout=20)
        woken.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.1)
    ex.shutdown(wait=True, cancel_futures=True)
    assert queued.cancelled() and blocker.result().success
    assert woken.wait(5), "a thread waiting on a cancelled future was not woken"
    thread.join()


def test_a_pipeline_whose_later_stage_cannot_start_leaves_nothing_running() -> None:
    marker = unique_sleep()
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        r = ex.submit(mpmsub.pipeline([["sleep", marker], ["no-such-program-xyz"]])).result(timeout=10)
    assert r.failure == "start" and "no-such-program-xyz" in (r.error or "")
    assert not wait_gone(marker)


def test_no_file_descriptor_leaks_over_many_jobs() -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    # No run history: its database, opened once on the first write, is not a job's.
    with MemoryAwareExecutor(cpus=2, memory="1G", history=False) as ex:
        ex.submit(["true"]).result(timeout=10)
        before = open_fds()
        futures = [
            ex.submit(j)
            for j in (
                ["true"],
                ["no-such-program-xyz"],
                mpmsub.pipeline([["echo"], ["cat"]]),
                mpmsub.Job(["pwd"]).working_dir("/no/such/dir"),
            )
        ] * 25
        wait(futures, timeout=60)
        assert open_fds() <= before + 2


def test_a_program_looked_up_once_is_looked_up_again_when_it_is_gone(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for d in (first, second):
        d.mkdir()
        tool = d / "mpmsub-test-tool"
        tool.write_text(f"#!/bin/sh\necho {d.name}\n")
        tool.chmod(0o755)
    env = {"PATH": f"{first}{os.pathsep}{second}{os.pathsep}{os.environ.get('PATH', '')}"}
    with mpmsub.MemoryAwareExecutor(cpus=1, memory="100M") as ex:
        assert ex.submit(mpmsub.Job(["mpmsub-test-tool"]).environment(env)).result().stdout == "a\n"
        (first / "mpmsub-test-tool").unlink()
        assert ex.submit(mpmsub.Job(["mpmsub-test-tool"]).environment(env)).result().stdout == "b\n"
        (second / "mpmsub-test-tool").unlink()
        r = ex.submit(mpmsub.Job(["mpmsub-test-tool"]).environment(env)).result()
        assert r.failure == "start" and "mpmsub-test-tool" in (r.error or "")


@pytest.mark.parametrize("delivery_started", [False, True])
def test_the_last_result_is_delivered_when_only_cancelled_jobs_remain(delivery_started: bool) -> None:
    ex = mpmsub.MemoryAwareExecutor(cpus=1, memory="1G", memory_reserve=0)
    if delivery_started:  # the results thread runs already when the last job ends
        first = ex.submit(["true"])
        first.add_done_callback(lambda f: None)
        first.result(timeout=10)
    seen = []
    a = ex.submit(["sleep", "0.5"])
    a.add_done_callback(lambda f: seen.append(f.result().returncode))
    b = ex.submit(["sleep", "5"])
    time.sleep(0.1)
    assert b.cancel()
    done = threading.Thread(target=ex.shutdown, daemon=True)
    done.start()
    done.join(10)
    assert not done.is_alive(), "shutdown() hung"
    assert a.result(timeout=1).returncode == 0 and seen == [0]


def test_an_empty_path_entry_still_means_the_jobs_directory(tmp_path: Path) -> None:
    tool = tmp_path / "echo"
    tool.write_text("#!/bin/sh\necho from the job directory\n")
    tool.chmod(0o755)
    env = {"PATH": f"{os.pathsep}/usr/bin{os.pathsep}/bin"}  # the empty first entry is '.'
    with mpmsub.MemoryAwareExecutor(cpus=1, memory="100M") as ex:
        r = ex.submit(mpmsub.Job(["echo", "x"]).environment(env).working_dir(tmp_path)).result()
    assert r.stdout == "from the job directory\n"


def test_jobs_die_with_a_driver_killed_by_sigkill(tmp_path: Path) -> None:
    """Nothing in a process runs after SIGKILL: the watchman kills what it left running, the
    whole session of each job, a process that left the job's process group included; a module
    named like one of the standard library's in the working directory does not stop it."""
    (tmp_path / "signal.py").write_text("raise SystemExit('not the standard library')\n")
    (tmp_path / "os.py").write_text("raise SystemExit('not the standard library')\n")
    a, b, c = unique_sleep(), unique_sleep(), unique_sleep()
    own_group = "import os, sys, time; os.setpgid(0, 0); time.sleep(float(sys.argv[1]))"
    code = (
        "import os, signal, time, mpmsub\n"
        "ex = mpmsub.MemoryAwareExecutor(cpus=2, memory='1G')\n"
        f"ex.submit(['sleep', {a!r}])\n"
        f"ex.submit(['sh', '-c', {sys.executable!r} + ' -c \"{own_group}\" {c} & sleep {b}'])\n"
        "time.sleep(1)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    driver = subprocess.run([sys.executable, "-I", "-c", code], env=ENV, cwd=tmp_path, timeout=30)
    assert driver.returncode == -signal.SIGKILL
    for arg in (a, b, c):
        assert not wait_gone(arg, timeout=3), arg


def test_the_watchman_hears_of_finished_jobs_when_the_executor_falls_idle() -> None:
    """A finished job's session must not stay on the watchman's list while nothing runs: its
    number may be a stranger's by the time the driver dies."""
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        assert ex.submit(["sleep", "0.2"]).result(timeout=10).success
        watchman = ex._launcher.watchman  # type: ignore[attr-defined]
        deadline = time.monotonic() + 5
        while watchman._words and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not watchman._words
        assert watchman._proc is not None and watchman._proc.poll() is None


def test_every_future_is_resolved_when_shutdown_returns() -> None:
    ex = MemoryAwareExecutor(cpus=2, memory="1G")
    futures = [ex.submit(["true"]) for _ in range(50)] + [ex.submit(pow, 2, i) for i in range(5)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)

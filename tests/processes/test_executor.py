from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import FIRST_COMPLETED, CancelledError, as_completed, wait
from pathlib import Path
from typing import List, Tuple

import pytest
from support.helpers import alloc_cmd, unique_sleep, wait_gone

import mpmsub
from mpmsub import JobFailedError, JobResult, MemoryAwareExecutor
from mpmsub._learn.history import History


def test_as_completed_and_wait_over_a_mix_of_submissions() -> None:
    with MemoryAwareExecutor(cpus=2, memory="1G") as ex:
        futures = [
            ex.submit(mpmsub.Job(["echo", "object"]).cpu(1).memory("10M")),
            ex.submit({"cmd": ["echo", "dict"], "p": 1, "m": "10M"}),
            ex.submit(["echo", "list"]),
            ex.submit(mpmsub.job(["echo", "convenience"], p=1)),
        ]
        outputs = sorted(f.result().stdout for f in as_completed(futures, timeout=30))  # type: ignore[misc]
        done, not_done = wait(futures, timeout=30)
    assert outputs == ["convenience\n", "dict\n", "list\n", "object\n"]
    assert len(done) == 4 and not not_done
    ids = [f.result().job_id for f in futures]
    assert ids == ["job_0001", "job_0002", "job_0003", "job_0004"]
    for f in futures:
        r = f.result()
        assert r.success and r.returncode == 0 and r.error is None
        assert r.runtime >= 0 and r.end_time >= r.start_time and r.cpu_used >= 0


def test_result_fields_of_a_failing_command() -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        r = ex.submit(["sh", "-c", "echo out; echo 'bad thing' >&2; exit 3"]).result(timeout=30)
    assert (r.success, r.returncode, r.failure) == (False, 3, "exit")
    assert r.stdout == "out\n" and r.stderr == "bad thing\n"
    assert r.error == "exited with status 3"
    with pytest.raises(JobFailedError, match="exited with status 3") as info:
        r.check_returncode()
    assert info.value.result is r


def test_the_ledger_never_overlaps_jobs_whose_memory_exceeds_the_budget(tmp_path: Path) -> None:
    # Budget 1000M: 600M jobs must run one at a time, while 300M jobs may join a 600M one.
    script = "import sys, time; t = time.time(); time.sleep(0.3); open(sys.argv[1], 'w').write(f'{t} {time.time()}')"
    sizes = {"big1": 600, "big2": 600, "small1": 300, "big3": 600, "small2": 300}
    with MemoryAwareExecutor(cpus=4, memory="1000M") as ex:
        futures = [
            ex.submit(mpmsub.Job([sys.executable, "-c", script, str(tmp_path / name)]).memory(mb))
            for name, mb in sizes.items()
        ]
        assert all(f.result(timeout=60).success for f in futures)
    spans = {}
    for name in sizes:
        start, end = (tmp_path / name).read_text().split()
        spans[name] = (float(start), float(end))
    names = list(spans)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            overlap = spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
            if overlap:
                assert sizes[a] + sizes[b] <= 1000, f"{a} and {b} overlapped"
    assert any(spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1] for a in names for b in names if a < b), (
        "jobs that fit together should have overlapped"
    )


def test_cancel_of_a_queued_future() -> None:
    marker = unique_sleep()
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        running = ex.submit(["sleep", "0.5"])
        queued = ex.submit(["sleep", marker])
        assert queued.cancel()
        assert queued.cancelled()
        assert running.result(timeout=30).success
        with pytest.raises(CancelledError):
            queued.result()
    assert not wait_gone(marker, timeout=0.1)


def test_running_future_cannot_be_cancelled() -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        future = ex.submit(["sleep", "0.3"])
        while not future.running():
            time.sleep(0.01)
        assert not future.cancel()
        assert future.result(timeout=30).success


def test_shutdown_with_cancel_futures_cancels_the_queue_and_finishes_the_running() -> None:
    ex = MemoryAwareExecutor(cpus=1, memory="1G")
    first = ex.submit(["sleep", "0.3"])
    rest = [ex.submit(["sleep", "5"]) for _ in range(5)]
    while not first.running():
        time.sleep(0.01)
    t0 = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - t0 < 3
    assert first.result().success
    assert all(f.cancelled() for f in rest)


def test_plain_shutdown_runs_the_queued_jobs() -> None:
    ex = MemoryAwareExecutor(cpus=1, memory="1G")
    futures = [ex.submit(["echo", str(i)]) for i in range(5)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=30).stdout for f in futures] == [f"{i}\n" for i in range(5)]


def test_an_executor_dropped_with_jobs_to_run_still_runs_them() -> None:
    """No reference to the executor is kept, and the collector runs: its jobs still end and its
    results still come (as `for r in MemoryAwareExecutor().map(...)` needs). It lives on until
    shut down, or until the program exits."""
    import gc

    from mpmsub._engine.executor import _live_executors

    before = set(_live_executors)
    ex = MemoryAwareExecutor(cpus=1, history=False)
    first = ex.submit(["sleep", "0.3"])
    second = ex.submit(["true"])
    time.sleep(0.1)  # the loop has taken them: nothing of it holds the executor's own methods now
    del ex
    gc.collect()
    assert first.result(timeout=30).success and second.result(timeout=30).success
    assert list(MemoryAwareExecutor(max_workers=1, history=False).map(abs, [-1, -2])) == [1, 2]
    dropped = set(_live_executors) - before
    assert len(dropped) == 2  # alive still, and shut down at exit; here, now (their workers too)
    for executor in dropped:
        executor.shutdown()


def test_a_closed_executor_is_no_longer_one_to_shut_down_at_exit() -> None:
    from mpmsub._engine.executor import _live_executors

    with MemoryAwareExecutor(max_workers=1, history=False) as ex:
        assert ex in _live_executors
        ex.submit(["true"]).result(timeout=30)
    assert ex not in _live_executors


def test_submit_after_shutdown_raises() -> None:
    ex = MemoryAwareExecutor(cpus=1, memory="1G")
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after the executor has been shut down"):
        ex.submit(["echo"])
    ex.shutdown()  # a second shutdown is harmless


def test_many_threads_submitting_at_once() -> None:
    results: List[JobResult] = []
    lock = threading.Lock()
    with MemoryAwareExecutor(cpus=2, memory="1G") as ex:

        def worker(n: int) -> None:
            futures = [ex.submit(["echo", f"{n}-{i}"]) for i in range(50)]
            for f in futures:
                r = f.result(timeout=60)
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 200
    assert all(r.success for r in results)
    assert len({r.job_id for r in results}) == 200
    assert sorted(r.stdout for r in results) == sorted(f"{n}-{i}\n" for n in range(4) for i in range(50))


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (mpmsub.Job(["true"]).cpu(4), "asks for 4 CPUs but the executor has 2"),
        (mpmsub.Job(["true"]).memory("2G"), "asks for 2G of memory but the executor's budget is 1G"),
    ],
)
def test_impossible_jobs_are_refused_at_submit(job: mpmsub.Job, message: str) -> None:
    with MemoryAwareExecutor(cpus=2, memory="1G") as ex:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=message):
            ex.submit(job)
        assert time.monotonic() - t0 < 1
        assert ex.submit(job.cpu(1).memory("1G")).result(timeout=30).success  # the id is free again


def test_duplicate_ids_are_refused_and_auto_ids_skip_taken_ones() -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        ex.submit(mpmsub.Job(["true"]).with_id("job_0001"))
        with pytest.raises(ValueError, match="duplicate job id 'job_0001'"):
            ex.submit(mpmsub.Job(["true"]).with_id("job_0001"))
        assert ex.submit(["true"]).result(timeout=30).job_id == "job_0002"


def test_bad_executor_arguments() -> None:
    with pytest.raises(ValueError, match="invalid cpus 0"):
        MemoryAwareExecutor(cpus=0)
    with pytest.raises(ValueError, match="invalid memory 'lots'"):
        MemoryAwareExecutor(memory="lots")
    with pytest.raises(ValueError, match="positive memory budget"):
        MemoryAwareExecutor(memory=0)
    with pytest.raises(ValueError, match="invalid max_workers -1"):
        MemoryAwareExecutor(max_workers=-1)


def test_defaults_detect_the_machine_and_max_workers_caps_jobs() -> None:
    with MemoryAwareExecutor() as ex:
        assert ex.cpus >= 1 and ex.memory > 0
    with MemoryAwareExecutor(max_workers=3) as ex:
        assert ex.cpus == 3  # given alone, max_workers is the parallelism, as in ProcessPoolExecutor
    with MemoryAwareExecutor(cpus=4, memory="1G", max_workers=1) as ex:
        futures = [
            ex.submit([sys.executable, "-c", "import time; print(time.time()); time.sleep(0.2)"]) for _ in range(3)
        ]
        spans = sorted((f.result().start_time, f.result().end_time) for f in futures)
    assert all(a[1] <= b[0] + 0.01 for a, b in zip(spans, spans[1:])), "max_workers=1 must run one job at a time"


def test_timeout_kills_the_whole_tree() -> None:
    marker = unique_sleep()
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        t0 = time.monotonic()
        r = ex.submit(mpmsub.Job(["sh", "-c", f"sleep {marker} & sleep {marker}"]).with_timeout(0.5)).result(30)
        elapsed = time.monotonic() - t0
    assert not r.success and r.failure == "timeout" and r.timed_out
    assert r.error == "timed out after 0.5 s"
    assert elapsed < 5
    assert not wait_gone(marker)


def test_background_processes_of_a_finished_job_are_not_left_behind() -> None:
    marker = unique_sleep()
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        r = ex.submit(["sh", "-c", f"sleep {marker} & echo started"]).result(timeout=30)
    assert r.success and r.stdout == "started\n"
    assert not wait_gone(marker)


def test_memory_used_is_the_peak_of_the_tree() -> None:
    with MemoryAwareExecutor(cpus=2, memory="2G") as ex:
        single = ex.submit(alloc_cmd(200, hold=0.3)).result(timeout=30)
        tree = ex.submit(
            ["sh", "-c", " & ".join([" ".join(f"'{a}'" for a in alloc_cmd(150, hold=1.0))] * 2) + " & wait"]
        ).result(timeout=30)
    assert 195 <= single.memory_used <= 260
    assert 290 <= tree.memory_used <= 400, tree.memory_used
    assert single.cpu_used > 0


def test_cwd_env_and_output_files(tmp_path: Path) -> None:
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    job = (
        mpmsub.Job(["sh", "-c", "pwd; echo $MPMSUB_TEST_VAR; echo oops >&2; echo $HOME >&2"])
        .working_dir(tmp_path)
        .environment({"MPMSUB_TEST_VAR": "hello"})
        .stdout_to(out)
        .stderr_to(err)
    )
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        r = ex.submit(job).result(timeout=30)
    assert r.success and r.stdout is None and r.stderr is None
    assert out.read_text() == f"{os.path.realpath(tmp_path)}\nhello\n"
    assert err.read_text() == f"oops\n{os.environ.get('HOME', '')}\n"  # the rest of the environment is inherited


def test_pipelines_connect_stages_and_fail_if_any_stage_fails() -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        ok = ex.submit(mpmsub.Job(["printf", "b\\na\\nb\\n"]).pipe_to(["sort"]).pipe_to(["uniq", "-c"])).result(30)
        bad = ex.submit(mpmsub.pipeline([["sh", "-c", "echo x; exit 4"], ["cat"]])).result(30)
        missing = ex.submit(mpmsub.pipeline([["echo", "x"], ["no-such-program-xyz"]])).result(30)
    assert ok.success and [line.split() for line in ok.stdout.splitlines()] == [["1", "a"], ["2", "b"]]  # type: ignore[union-attr]
    assert not bad.success and bad.returncode == 4 and bad.stdout == "x\n"
    assert bad.error == "exited with status 4 (pipeline stage 1: 'sh')"
    assert bad.stage_returncodes == [4, 0]
    assert not missing.success and missing.error == "command not found: 'no-such-program-xyz'"


def test_missing_program_and_cwd_are_failed_results_not_exceptions(tmp_path: Path) -> None:
    with MemoryAwareExecutor(cpus=2, memory="1G") as ex:
        futures = [
            ex.submit(["echo", "a"]),
            ex.submit(["no-such-program-xyz", "arg"]),
            ex.submit(mpmsub.Job(["pwd"]).working_dir(tmp_path / "nope")),
            ex.submit(["echo", "b"]),
        ]
        results = [f.result(timeout=30) for f in futures]
    assert [r.success for r in results] == [True, False, False, True]
    assert results[1].error == "command not found: 'no-such-program-xyz'" and results[1].failure == "start"
    assert results[2].error == f"working directory not found: '{tmp_path / 'nope'}'"


def test_a_signal_is_reported() -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        r = ex.submit(["sh", "-c", "kill -SEGV $$"]).result(timeout=30)
    assert (r.returncode, r.failure, r.error) == (-signal.SIGSEGV, "signal", "killed by signal SIGSEGV")


def test_leaving_the_with_block_on_an_exception_kills_running_trees() -> None:
    marker = unique_sleep()
    with pytest.raises(ZeroDivisionError), MemoryAwareExecutor(cpus=2, memory="1G", kill_grace=0.5) as ex:
        running = ex.submit(["sh", "-c", f"sleep {marker} & sleep {marker}"])
        queued = [ex.submit(["sleep", marker]) for _ in range(3)]
        while not running.running():
            time.sleep(0.01)
        1 / 0  # noqa: B018
    r = running.result(timeout=10)
    assert r.failure == "cancelled" and "ZeroDivisionError" in (r.error or "")
    assert sum(f.cancelled() for f in queued) >= 2
    assert not wait_gone(marker)


def interrupted_when_ready(script: Path) -> Tuple[bytes, bytes]:
    """Run a driver script, send it SIGINT once it prints "ready": its stdout and stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mpmsub.__file__).parent.parent), *sys.path])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=30)


def test_ctrl_c_in_a_driver_script_leaves_no_process(tmp_path: Path) -> None:
    marker = unique_sleep()
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time, mpmsub
        with mpmsub.MemoryAwareExecutor(cpus=2, memory="1G", kill_grace=0.5) as ex:
            futures = [ex.submit(["sh", "-c", "sleep {marker} & sleep {marker}"]) for _ in range(4)]
            while not futures[0].running():
                time.sleep(0.01)
            print("ready", flush=True)
            for f in futures:
                f.result()
    """)
    )
    _, stderr = interrupted_when_ready(script)
    assert b"KeyboardInterrupt" in stderr
    assert not wait_gone(marker)


def test_ctrl_c_during_shutdown_wait_stops_every_job_in_a_process_that_goes_on(tmp_path: Path) -> None:
    """As in a notebook: the KeyboardInterrupt is caught, and the process lives on. Its jobs must
    be stopped and their futures done by then (on Python 3.11 an interrupted Thread.join left
    the executor taking its loop for ended)."""
    marker = unique_sleep()
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, subprocess, time, mpmsub
        ex = mpmsub.MemoryAwareExecutor(cpus=2, memory="1G", kill_grace=0.5, history=False)
        futures = [ex.submit(["sleep", "{marker}"]) for _ in range(6)]
        while not futures[0].running():
            time.sleep(0.01)
        print("ready", flush=True)
        try:
            ex.shutdown(wait=True)
        except KeyboardInterrupt:
            pass
        done = [f.done() for f in futures]
        left = subprocess.run(["pgrep", "-f", "sleep {marker}"], capture_output=True, text=True).stdout.split()
        print(json.dumps({{"done": done, "left": left}}), flush=True)
    """)
    )
    out, stderr = interrupted_when_ready(script)
    seen = json.loads(out.decode().splitlines()[-1])
    assert seen == {"done": [True] * 6, "left": []}, stderr.decode()[-2000:]


def test_program_exit_without_shutdown_finishes_the_jobs(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import mpmsub
        ex = mpmsub.MemoryAwareExecutor(cpus=1, memory="1G")
        ex.submit(mpmsub.Job(["sh", "-c", "sleep 0.3; echo done"]).stdout_to({str(out)!r}))
    """)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mpmsub.__file__).parent.parent), *sys.path])}
    subprocess.run([sys.executable, str(script)], check=True, timeout=30, env=env)
    assert out.read_text() == "done\n"


@pytest.mark.parametrize("threads, pidfds", [(True, True), (True, False), (False, True), (False, False)])
def test_jobs_that_end_at_interpreter_shutdown_need_no_new_thread(threads: bool, pidfds: bool, tmp_path: Path) -> None:
    """Python 3.12.0-3.12.2 start no thread once the interpreter shuts down, which is when the
    jobs of a program that ends without shutdown() finish: their history rows, done-callbacks
    (one waiting for another future), calls and (without pidfds) exits must be handled without
    one. It hung there. `threads` False plays such a Python on any other: no thread mpmsub
    would start on demand can."""
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys
        if not {pidfds!r}:
            del os.pidfd_open  # as on macOS or Linux before 5.3: exits are waited for otherwise
        import mpmsub
        from mpmsub import _threads
        if not {threads!r}:
            _threads.start = lambda *args, **kwargs: None
        if __name__ == "__main__":  # the call's worker imports this file
            ex = mpmsub.MemoryAwareExecutor(cpus=2, memory="1G", history={str(tmp_path / "h.db")!r})
            job = ex.submit(["sh", "-c", "sleep 0.5; echo job"])
            later = ex.submit(["sh", "-c", "sleep 0.8; echo later"])
            # A callback that waits for another future must not stop what resolves it (the loop).
            job.add_done_callback(lambda f: print("callback", f.result().stdout.strip(), later.result().stdout.strip()))
            call = ex.submit(pow, 2, 10)
            call.add_done_callback(lambda f: print("call", f.result(), flush=True))
    """)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mpmsub.__file__).parent.parent), *sys.path])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["call 1024", "callback job later"], done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    with History(str(tmp_path / "h.db"), tolerant=False) as history:
        assert sum(1 for _ in history.rows()) == 3  # every run recorded


def test_done_callbacks_and_first_completed() -> None:
    seen: List[str] = []
    with MemoryAwareExecutor(cpus=2, memory="1G") as ex:
        slow = ex.submit(["sleep", "1"])
        fast = ex.submit(["echo", "fast"])
        fast.add_done_callback(lambda f: seen.append(f.result().stdout))
        done, _ = wait([slow, fast], return_when=FIRST_COMPLETED, timeout=30)
        assert fast in done and slow not in done
    assert seen == ["fast\n"]


def test_large_output_does_not_deadlock() -> None:
    with MemoryAwareExecutor(cpus=1, memory="1G") as ex:
        r = ex.submit(
            [
                sys.executable,
                "-c",
                "import sys; sys.stdout.write('x' * (20 * 2**20)); sys.stderr.write('y' * (5 * 2**20))",
            ]
        ).result(timeout=60)
    assert r.success and len(r.stdout or "") == 20 * 2**20 and len(r.stderr or "") == 5 * 2**20
